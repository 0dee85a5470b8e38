"""A tiny BERT text classifier swept with Ray Tune: Hugging Face models, dict batches, fused slots.

Every trial is a ``transformers.BertForSequenceClassification`` built from a
``BertConfig`` (nothing is downloaded), trained as one slot of a fused stack.
The script reads as a Hugging Face training script does:

- ``data()`` returns tokenized columns, ``{"input_ids", "attention_mask",
  "labels"}``, for a training and a validation set: every batch is such a dict;
- the training step is ``model(**batch).loss``, the model's own loss from
  ``labels=``, and the evaluation reads ``out.loss`` and ``out.logits`` from
  its output object;
- ASHA stops the weaker learning rates early and hands their slots on.

The text is a synthetic review task from a fixed vocabulary, built in code:
one to three clauses such as "the plot was not very dull but the music is
lovely", labelled by the sum of their sentiment words, a ``not``/``never``
flipping its clause. A bag of words cannot tell "not good" from "good": the
model has to read word order. ::

    python examples/bert_text.py                 # 8 trials, 8 slots, ASHA, about a minute on 2 CPUs
    python examples/bert_text.py --trials 16 --max-t 12

Needs the ``hf`` extra: ``pip install -e ".[hf]"``.
"""

from __future__ import annotations

import argparse
import os
import time

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler

import ray_modelbatch
from ray_modelbatch.optim import schedules
from ray_modelbatch.tune import SweepProgress, batched_trainable

# ------------------------------------------------------------------ the text
SPECIAL = ["[PAD]", "[CLS]", "[SEP]"]  # [PAD] is 0: BertConfig's pad_token_id
POSITIVE = ["good", "great", "excellent", "lovely", "fun", "superb", "wonderful", "brilliant", "charming", "moving"]
NEGATIVE = ["bad", "awful", "boring", "dull", "terrible", "poor", "weak", "horrible", "clumsy", "bland"]
NEGATORS = ["not", "never"]
INTENSIFIERS = ["very", "really", "quite", "so"]
NOUNS = ["movie", "film", "plot", "acting", "story", "cast", "music", "ending", "script", "pacing"]
GLUE = ["the", "was", "is", "and", "but"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + NEGATORS + INTENSIFIERS + NOUNS + GLUE
WORD_ID = {w: i for i, w in enumerate(VOCAB)}
MAX_LEN = 24  # [CLS] + at most 3 clauses of 6 words and 2 joining words + [SEP] = 22 tokens
TRAIN_ROWS, VAL_ROWS = 2000, 500


def review(g: torch.Generator) -> tuple[list[str], int]:
    """One review and its sentiment score: each clause counts +1 or -1, flipped by a negation."""

    def pick(words: list[str]) -> str:
        return words[int(torch.randint(len(words), (1,), generator=g))]

    words: list[str] = []
    score = 0
    for clause in range(int(torch.randint(1, 4, (1,), generator=g))):
        if clause:
            words.append(pick(["and", "but"]))
        words += ["the", pick(NOUNS), pick(["was", "is"])]
        negated = bool(torch.rand(1, generator=g) < 0.3)
        if negated:
            words.append(pick(NEGATORS))
        if torch.rand(1, generator=g) < 0.3:
            words.append(pick(INTENSIFIERS))
        positive = bool(torch.rand(1, generator=g) < 0.5)
        words.append(pick(POSITIVE if positive else NEGATIVE))
        score += (1 if positive else -1) * (-1 if negated else 1)
    return words, score


def tokenized(n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` reviews with a non-zero score as a tokenizer with ``padding="max_length"`` returns them, plus labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(n, MAX_LEN, dtype=torch.long)
    labels = torch.zeros(n, dtype=torch.long)
    i = 0
    while i < n:
        words, score = review(g)
        if score == 0:  # neither positive nor negative: not a usable example
            continue
        tokens = ["[CLS]", *words, "[SEP]"]
        ids[i, : len(tokens)] = torch.tensor([WORD_ID[w] for w in tokens])
        labels[i] = int(score > 0)
        i += 1
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


def load_reviews() -> tuple[dict, dict]:
    """``data()``: the training and the validation columns. Called once per slot host."""
    return tokenized(TRAIN_ROWS, seed=0), tokenized(VAL_ROWS, seed=1)


# ----------------------------------------------------------- model and steps
def make_model(config: dict) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    # BERT's own dropout (0.1) stays on: each slot draws its masks from its own generator, seeded as the model
    # alone would be (ray_modelbatch.slot_random), so a trial trains the same whatever shares its stack.
    return BertForSequenceClassification(BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=MAX_LEN, num_labels=2))


def train_step(model, batch, config):
    """As for one model: the batch is the dict, the model computes its own loss from ``labels``."""
    return model(**batch).loss


def eval_step(model, batch, config):
    out = model(**batch)
    return {"loss": out.loss, "accuracy": (out.logits.argmax(-1) == batch["labels"]).float().mean()}


def optimizer_hparams(config: dict) -> dict:
    return {"lr": config["lr"], "weight_decay": config["wd"],
            "schedule": schedules.warmup_linear(config["warmup_steps"], config["total_steps"])}


# -------------------------------------------------------------------- sweep
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trials", type=int, default=8, help="Tune trials")
    p.add_argument("--slots", type=int, default=8, help="slots of the host (trials trained at once)")
    p.add_argument("--max-t", type=int, default=8, help="most Tune iterations per trial")
    p.add_argument("--steps", type=int, default=40, help="fused steps per Tune iteration")
    p.add_argument("--batch-size", type=int, default=32, help='rows per slot per step')
    p.add_argument("--storage", default="./runs", help='RunConfig storage_path')
    p.add_argument("--name", default="bert_text", help="the experiment's name (its folder under --storage)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray; None: os.cpu_count()")
    args = p.parse_args()

    t0 = time.monotonic()
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=args.num_cpus or os.cpu_count() or 2, include_dashboard=False, logging_level="WARNING")
    T = batched_trainable(
        model=make_model,
        optimizer=ray_modelbatch.optim.AdamW,
        hparams=optimizer_hparams,
        data=load_reviews,
        train_step=train_step,
        eval_step=eval_step,  # reported as "loss" and "accuracy"
        batch_size=args.batch_size,
        steps_per_report=args.steps,
        slots_per_host=args.slots,
        num_hosts=1,
    )
    total = args.max_t * args.steps
    space = {
        "lr": tune.loguniform(3e-4, 1e-2),
        "wd": tune.loguniform(1e-4, 1e-1),
        "warmup_steps": tune.choice([0, total // 10]),
        "total_steps": total,
        "seed": tune.randint(0, 2**31 - 1),
    }
    try:
        tuner = tune.Tuner(
            T,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="accuracy", mode="max", num_samples=args.trials,
                scheduler=ASHAScheduler(max_t=args.max_t, grace_period=min(2, args.max_t), reduction_factor=2),
                max_concurrent_trials=T.max_concurrent(), reuse_actors=True),
            run_config=tune.RunConfig(name=args.name, storage_path=os.path.abspath(args.storage), verbose=0,
                                      callbacks=[SweepProgress(T, metric="accuracy", mode="max")]),
        )
        results = tuner.fit()
    finally:
        T.shutdown_hosts()
        if started:
            ray.shutdown()

    errors = [r.error for r in results if r.error is not None]
    df = results.get_dataframe(filter_metric="accuracy", filter_mode="max").sort_values("accuracy", ascending=False)
    print(f"\n{len(results)} trials ({len(errors)} errored), each a tiny BERT in one fused slot; by validation "
          "accuracy (each at its best report):")
    print(f"{'trial':>6} {'lr':>9} {'wd':>9} {'warmup':>6} {'at it.':>6} {'loss':>7} {'accuracy':>8}")
    for _, r in df.iterrows():
        print(f"{r['trial_id'].rsplit('_', 1)[-1]:>6} {r['config/lr']:>9.2e} {r['config/wd']:>9.2e} "
              f"{int(r['config/warmup_steps']):>6} {int(r['training_iteration']):>6} {r['loss']:>7.4f} "
              f"{r['accuracy']:>8.3f}")
    best = df.iloc[0]  # the best report of any trial (a Result's metrics are its trial's last report)
    majority = float(load_reviews()[1]["labels"].float().mean())
    print(f"\nbest validation accuracy {best['accuracy']:.3f} (majority class "
          f"{max(majority, 1 - majority):.3f}), lr {best['config/lr']:.2e}; total time {time.monotonic() - t0:.1f}s")
    if errors:
        raise SystemExit(f"{len(errors)} trials errored, e.g. {errors[0]!r}")


if __name__ == "__main__":
    main()
