"""Hugging Face transformers models trained fused, with keyword inputs and dict batches (issue 13, item 4).

The reference is always each model trained alone with ``torch.optim.AdamW``,
as built from its config (SDPA attention, caches on): a fused slot must end
within 1e-5 of it after 5 steps (dropout off, so both compute the same function).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from ray_modelbatch import FusedEngine, FusionError, IncompatibleModelsError, ModelBatch, optim  # noqa: E402
from ray_modelbatch.data import sweep_inputs  # noqa: E402
from ray_modelbatch.dataset_streams import DatasetStreams, per_slot_streams  # noqa: E402
from ray_modelbatch.slot_group import SlotGroup, stack_key  # noqa: E402
from ray_modelbatch.tune.spec import SlotSpec  # noqa: E402
from tune_helpers import (errors, fit, hf_eval_step, hf_train_step, ray_session, text_columns,  # noqa: E402,F401
                          tiny_bert)

S, B, L, STEPS, VOCAB = 3, 6, 10, 5, 40
LRS = [3e-3, 1e-3, 3e-4]
TOL = 1e-5


def bert(**kw) -> nn.Module:
    kw = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, **kw}
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3, **kw)
    return transformers.BertForSequenceClassification(cfg)


def gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def hf_step(model, batch, config):
    """The step as an HF user writes it: the batch is the dict, the model computes its own loss from labels=."""
    return model(**batch).loss


def _batches(kind: str, seed: int = 1) -> list[dict]:
    """Per-slot dict batches ``[S, B, L]`` with right padding in some rows (and one row without any)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, VOCAB, (S, B, L), generator=g)
        mask = torch.ones(S, B, L, dtype=torch.long)
        mask[:, 0, 6:] = 0
        mask[:, 2, 3:] = 0
        ids = torch.where(mask.bool(), ids, 0)  # [PAD] is 0
        labels = torch.randint(0, 3, (S, B), generator=g) if kind == "bert" else torch.where(mask.bool(), ids, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _fused_against_solo(make) -> tuple[ModelBatch, list[nn.Module], list, list]:
    kind = "bert" if make is bert else "gpt2"
    torch.manual_seed(0)
    models = [make() for _ in range(S)]
    solo = [copy.deepcopy(m) for m in models]
    mb = ModelBatch(models)
    engine = FusedEngine(mb, optim.AdamW(mb, lr=LRS, weight_decay=0.01), step_fn=hf_step)
    batches = _batches(kind)
    fused = [engine.train_step(b, per_slot=True).losses for b in batches]
    return mb, solo, fused, [_train_alone(model, i, batches) for i, model in enumerate(solo)]


def _train_alone(model: nn.Module, i: int, batches: list[dict]) -> list[float]:
    """Model ``i`` trained by itself on its rows of ``batches`` with ``torch.optim.AdamW``; its losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=LRS[i], weight_decay=0.01)
    losses = []
    for b in batches:
        opt.zero_grad()
        loss = model(**{k: v[i] for k, v in b.items()}).loss
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _assert_close(mb: ModelBatch, solo: list[nn.Module], make, fused: list, alone: list) -> None:
    for i in range(S):
        got = mb.slot_module(i, make())
        for (name, a), b in zip(got.named_parameters(), solo[i].parameters()):
            torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=f"slot {i} {name}")
        for t in range(STEPS):
            assert float(fused[t][i]) == pytest.approx(alone[i][t], abs=1e-5)


def test_bert_classifier_with_padding_trains_like_each_model_alone():
    mb, solo, fused, alone = _fused_against_solo(bert)
    _assert_close(mb, solo, bert, fused, alone)
    assert solo[0].config._attn_implementation == "sdpa"  # the user's models are untouched


def test_gpt2_lm_trains_like_each_model_alone_and_keeps_its_head_tied():
    mb, solo, fused, alone = _fused_against_solo(gpt2)
    assert "lm_head.weight" not in mb.params  # the head is the embedding: stacked once
    _assert_close(mb, solo, gpt2, fused, alone)
    got = mb.slot_module(0, gpt2())
    assert got.lm_head.weight is got.transformer.wte.weight


def test_gpt2_gelu_is_torchs_tanh_kernel_in_the_stack_and_the_users_own_in_the_models():
    models = [gpt2() for _ in range(2)]
    mb = ModelBatch(models)
    act = mb._template.transformer.h[0].mlp.act
    assert type(act).__name__ == "NewGELUActivation"  # the module stays (state_dict, names); its forward is torch's
    x = torch.randn(4, 7)
    torch.testing.assert_close(act(x), F.gelu(x, approximate="tanh"), atol=0, rtol=0)
    torch.testing.assert_close(act(x), models[0].transformer.h[0].mlp.act(x), atol=1e-6, rtol=0)
    assert "forward" not in vars(models[0].transformer.h[0].mlp.act)  # the user's models are untouched


def test_output_objects_come_back_with_a_slot_dimension_and_without_caches():
    torch.manual_seed(0)
    models = [gpt2() for _ in range(S)]
    assert models[0].config.use_cache  # GPT-2's default: a DynamicCache a fused forward could not return
    mb = ModelBatch(models)
    ids = torch.randint(1, VOCAB, (B, L))
    with torch.no_grad():
        for out in (mb(ids), mb(ids, use_cache=True), mb({"input_ids": ids, "labels": ids})):
            assert isinstance(out, transformers.modeling_outputs.CausalLMOutputWithCrossAttentions)
            assert out.logits.shape == (S, B, L, VOCAB)
            assert all(isinstance(v, torch.Tensor) for v in out.values())  # no cache object
            for i, m in enumerate(models):
                torch.testing.assert_close(out.logits[i], m(ids).logits, atol=1e-5, rtol=1e-5)
        assert out.loss.shape == (S,)
    assert models[0].config.use_cache  # only the stack's own copy changed


def test_keyword_inputs_pass_through_forward_loss_and_evaluation():
    torch.manual_seed(0)
    models = [bert() for _ in range(S)]
    mb = ModelBatch(models)
    b = _batches("bert")[0]
    with torch.no_grad():
        # per-slot keyword tensors next to a per-slot positional input
        out = mb(b["input_ids"], attention_mask=b["attention_mask"], per_slot=True)
        ref = torch.stack([m(b["input_ids"][i], attention_mask=b["attention_mask"][i]).logits
                           for i, m in enumerate(models)])
        torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-5)
        # the simple path: x a dict, y the labels, a loss on the output object
        x = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        losses, _ = mb.forward_loss(x, b["labels"], lambda o, y: F.cross_entropy(o.logits, y), per_slot=True)
        torch.testing.assert_close(losses, torch.stack([F.cross_entropy(ref[i], b["labels"][i]) for i in range(S)]),
                                   atol=1e-5, rtol=1e-5)
    # evaluation of dict batches without targets, in chunks: the step gets the dict
    engine = FusedEngine(mb, optim.AdamW(mb, lr=1e-3), step_fn=hf_step,
                         eval_fn=lambda m, batch, c: {"loss": m(**batch).loss})
    shared = {k: v[0] for k, v in b.items()}
    res = engine.evaluate(shared, None, batch_size=4)
    with torch.no_grad():
        want = [sum(float(m(**{k: v[s:s + 4] for k, v in shared.items()}).loss) * min(4, B - s)
                    for s in range(0, B, 4)) / B for m in models]
    assert res["loss"].tolist() == pytest.approx(want, rel=1e-5)


def test_padding_rows_of_embeddings_stay_untrained_in_every_slot():
    """torch's vmap rule for nn.Embedding(padding_idx) leaves only slot 0's padding row out of the gradient."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Embedding(VOCAB, 8, padding_idx=0), nn.Flatten(), nn.Linear(8 * L, 3)) for _ in range(S)]
    solo = [copy.deepcopy(m) for m in models]
    mb = ModelBatch(models)
    engine = FusedEngine(mb, optim.Adam(mb, lr=1e-2), F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 4, (S, B, L), generator=g), torch.randint(0, 3, (S, B), generator=g)
    engine.train_step(x, y, per_slot=True)
    for i in range(S):
        opt = torch.optim.Adam(solo[i].parameters(), lr=1e-2)
        F.cross_entropy(solo[i](x[i]), y[i]).backward()
        opt.step()
        got = mb.slot_module(i, copy.deepcopy(solo[i]))
        torch.testing.assert_close(got[0].weight, solo[i][0].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(got[0].weight[0], models[i][0].weight[0])  # the padding row did not move


def test_embedding_bag_offsets_per_slot_train_like_each_model_alone():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag, self.head = nn.EmbeddingBag(VOCAB, 8, mode="mean"), nn.Linear(8, 3)

        def forward(self, text, offsets):
            return self.head(self.bag(text, offsets))

    torch.manual_seed(0)
    models = [Bag() for _ in range(S)]
    solo = [copy.deepcopy(m) for m in models]
    mb = ModelBatch(models)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, VOCAB, (S, 12), generator=g)
    offsets = torch.tensor([[0, 3, 7, 10], [0, 1, 2, 3], [0, 6, 8, 11]])
    y = torch.randint(0, 3, (S, 4), generator=g)
    engine = FusedEngine(mb, optim.Adam(mb, lr=1e-2), step_fn=lambda m, b, c: F.cross_entropy(m(**b[0]), b[1]))
    for _ in range(3):
        engine.train_step({"text": text, "offsets": offsets}, y, per_slot=True)
    for i in range(S):
        opt = torch.optim.Adam(solo[i].parameters(), lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(solo[i](text[i], offsets[i]), y[i]).backward()
            opt.step()
        for a, b in zip(mb.slot_module(i, Bag()).parameters(), solo[i].parameters()):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _columns(n: int, seed: int) -> dict:
    b = _batches("bert", seed)
    return {k: torch.cat([v.flatten(0, 1) for v in (bb[k] for bb in b)])[:n] for k in b[0]}


def test_dict_batches_flow_from_data_through_streams_to_the_step():
    train, val = _columns(48, 1), _columns(12, 2)
    data = sweep_inputs((train, val))
    x, y, xv, yv = data
    assert y is None and yv is None and sorted(x) == ["attention_mask", "input_ids", "labels"]
    streams = per_slot_streams(data, 4, [0, 1])
    xb, yb = streams.next_batch([0, 1], skip=[False, True])
    assert yb is None and xb["input_ids"].shape == (2, 4, L) and torch.equal(xb["labels"][1], xb["labels"][0])

    seen = []

    def step(model, batch, config):
        seen.append(sorted(batch))
        return model(**batch).loss

    def evaluate(model, batch, config):
        out = model(**batch)
        return {"nll": out.loss, "accuracy": (out.logits.argmax(-1) == batch["labels"]).float().mean()}

    spec = SlotSpec(model=lambda c: None, optimizer=optim.AdamW, hparams=lambda c: {}, loss=None, data=lambda: None,
                    train_step=step, eval_step=evaluate, batch_size=4, steps_per_report=3)
    torch.manual_seed(0)
    first = bert()
    group = SlotGroup(spec, stack_key(first), first, data, 4, "cpu", config={})
    slots = [group.add(f"t{i}", bert(), seed=i, hparams={"lr": 1e-3}) for i in range(2)]
    done = []
    while not done:
        done = group.step(slots)
    res = group.finish(done)
    assert seen[-1] == ["attention_mask", "input_ids", "labels"]
    for s in slots:
        assert {"nll", "accuracy", "train_loss"} <= set(res[s]) and res[s]["slot_steps"] == 3
        with torch.no_grad():
            alone = evaluate(group.mb.slot_module(s, bert()).eval(), xv, {})
        assert res[s]["nll"] == pytest.approx(float(alone["nll"]), rel=1e-5)


def test_keyword_inputs_and_separate_labels_through_the_simple_loss_path():
    """data() as (x_train, y_train, x_val, y_val) with dicts as x: loss= and metrics= read the output object."""
    train, val = _columns(48, 1), _columns(12, 2)
    y, yv = train.pop("labels"), val.pop("labels")
    data = sweep_inputs((train, y, val, yv))
    spec = SlotSpec(model=lambda c: None, optimizer=optim.AdamW, hparams=lambda c: {}, data=lambda: None,
                    loss=lambda out, t: F.cross_entropy(out.logits, t),
                    metrics={"acc": lambda out, t: (out.logits.argmax(-1) == t).float().mean()},
                    batch_size=4, steps_per_report=2)
    torch.manual_seed(0)
    first = bert()
    group = SlotGroup(spec, stack_key(first), first, data, 4, "cpu", config={})
    slot = group.add("t", bert(), seed=0, hparams={"lr": 1e-3})
    done = []
    while not done:
        done = group.step([slot])
    res = group.finish(done)[slot]
    with torch.no_grad():
        logits = group.mb.slot_module(slot, bert()).eval()(**val).logits
    assert res["val_loss"] == pytest.approx(float(F.cross_entropy(logits, yv)), rel=1e-5)
    assert res["val_acc"] == pytest.approx(float((logits.argmax(-1) == yv).float().mean()))


def test_a_dataset_of_dict_examples_streams_dict_batches():
    cols = _columns(20, 3)

    class Examples(torch.utils.data.Dataset):  # what datasets.Dataset.with_format("torch") gives
        def __len__(self):
            return 20

        def __getitem__(self, i):
            return {k: v[i] for k, v in cols.items()}

    data = sweep_inputs((Examples(), Examples()))
    assert data.y_val is None and torch.equal(data.x_val["input_ids"], cols["input_ids"])
    streams = DatasetStreams(Examples(), 4, [5, 6])
    xb, yb = streams.next_batch([0, 1])
    assert yb is None and set(xb) == set(cols) and xb["attention_mask"].shape == (2, 4, L)
    rows = [int((cols["input_ids"] == xb["input_ids"][1, j]).all(1).nonzero()[0]) for j in range(4)]
    assert torch.equal(xb["labels"][1], cols["labels"][rows])


def test_configs_that_change_the_forward_train_in_different_stacks():
    assert stack_key(bert()) == stack_key(bert())
    assert stack_key(bert()) != stack_key(bert(problem_type="multi_label_classification"))


def test_buffers_outside_the_state_dict_follow_the_model_into_new_slots():
    """A BERT's position_ids are a non-persistent buffer: a slot added after a resize must get them too."""

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("pos", torch.arange(4.0), persistent=False)
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x + self.pos)

    mb = ModelBatch([Positions()])
    mb.resize(3)
    assert torch.equal(mb.buffers["pos"][2], torch.arange(4.0))  # a new, empty slot
    mb.buffers["pos"][1].zero_()
    mb.reset_slot(1, Positions())
    assert torch.equal(mb.buffers["pos"][1], torch.arange(4.0))


def test_a_tiny_bert_sweep_through_tune_with_dict_batches(ray_session, tmp_path):
    """data() returns dicts of columns, the steps take the dict batch, the trained BERT comes back."""
    from ray import tune

    from ray_modelbatch.tune import batched_trainable

    T = batched_trainable(model=tiny_bert, optimizer=optim.AdamW, hparams=lambda c: {"lr": c["lr"]},
                          data=text_columns, train_step=hf_train_step, eval_step=hf_eval_step, batch_size=32,
                          steps_per_report=20, slots_per_host=4, idle_timeout_s=3.0)
    try:
        grid, _ = fit(T, {"lr": tune.grid_search([3e-3, 1e-2]), "seed": 0}, tmp_path, metric="accuracy", mode="max",
                      run_kw={"stop": {"training_iteration": 3},
                              "checkpoint_config": tune.CheckpointConfig(checkpoint_at_end=True)})
    finally:
        T.shutdown_hosts()
    assert not errors(grid), errors(grid)
    assert all({"accuracy", "loss", "train_loss"} <= set(r.metrics) for r in grid)
    best = grid.get_best_result()
    assert best.metrics["accuracy"] > 0.7, best.metrics
    model = T.load_model(best.checkpoint)
    assert isinstance(model, transformers.BertForSequenceClassification)
    _, val = text_columns()
    with torch.no_grad():
        acc = float(hf_eval_step(model, val, {})["accuracy"])
    assert acc == pytest.approx(best.metrics["accuracy"], abs=1e-6)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_with_dropout_on_each_slot_draws_its_model_s_own_masks(kind):
    """Dropout on (0.1 everywhere): each slot's generator starts where its model's construction left the global
    one, so the fused slot draws the masks its model draws alone (its own SDPA or eager attention included)."""
    from ray_modelbatch.slot_random import global_state

    p = 0.1
    make = (lambda: bert(hidden_dropout_prob=p, attention_probs_dropout_prob=p)) if kind == "bert" else \
        (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=p, embd_pdrop=p,
            attn_pdrop=p, bos_token_id=0, eos_token_id=0)))
    models, states = [], []
    for i in range(S):
        torch.manual_seed(10 + i)
        models.append(make())
        states.append(global_state("cpu"))
    solo = [copy.deepcopy(m) for m in models]
    mb = ModelBatch(models)
    for i, st in enumerate(states):
        mb.random.set_state(i, st)
    engine = FusedEngine(mb, optim.AdamW(mb, lr=LRS, weight_decay=0.01), step_fn=hf_step)
    batches = _batches(kind)
    fused = [engine.train_step(b, per_slot=True).losses for b in batches]
    alone = []
    saved = torch.get_rng_state()
    for i, model in enumerate(solo):
        torch.set_rng_state(states[i])  # its dropout draws from where its construction left the generator
        alone.append(_train_alone(model, i, batches))
        assert torch.equal(mb.random.state(i), torch.get_rng_state()), i  # as many numbers drawn
    torch.set_rng_state(saved)
    _assert_close(mb, solo, make, fused, alone)


def test_gradient_checkpointing_is_refused_in_one_line_naming_the_switch():
    """HF's gradient checkpointing recomputes layers in the backward, outside vmap, and its input hook calls
    requires_grad_ inside it: the fused forward failed with advice to make the forward pure. Refused at the
    stack's build instead, naming the call that turns it off; the same models train once it is off."""
    models = [bert() for _ in range(2)]
    for m in models:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(IncompatibleModelsError, match=r"model 0 \(BertForSequenceClassification\) has gradient "
                                                      r"checkpointing on .* Fix: call model.gradient_checkpointing_"
                                                      r"disable\(\) and model.disable_input_require_grads\(\) "
                                                      r"before stacking"):
        ModelBatch(models)
    for m in models:
        m.gradient_checkpointing_disable()
    with pytest.raises(IncompatibleModelsError, match=r"input-requires-grad hook .* Fix: call "
                                                      r"model.disable_input_require_grads\(\) before stacking"):
        ModelBatch(models)  # the hook outlives gradient_checkpointing_disable()
    for m in models:
        m.disable_input_require_grads()
    mb = ModelBatch(models)
    engine = FusedEngine(mb, optim.AdamW(mb, lr=1e-3), step_fn=hf_step)
    assert engine.train_step({k: v[:2] for k, v in _batches("bert")[0].items()}, per_slot=True).updated.all()


def test_a_loss_given_the_models_output_object_is_blamed_not_the_forward():
    """loss=F.cross_entropy on a model that returns a SequenceClassifierOutput: the loss failed, not the
    forward; the line names the output's type and fields and the fix (out.logits)."""
    mb = ModelBatch([bert() for _ in range(2)])
    engine = FusedEngine(mb, optim.AdamW(mb, lr=1e-3), F.cross_entropy)
    b = {k: v[0] for k, v in _batches("bert")[0].items()}
    y = b.pop("labels")
    with pytest.raises(FusionError, match=r"The loss 'cross_entropy' failed on the model's output, a "
                                          r"SequenceClassifierOutput \(fields: logits\), not a tensor: .*The forward "
                                          r"ran\. Fix: .*F\.cross_entropy\(out\.logits, y\)"):
        engine.train_step(b, y)
