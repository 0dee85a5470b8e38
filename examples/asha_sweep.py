"""ASHA sweep on scikit-learn's digits: 64 Ray Tune trials through 16 fused slots on one host.

Every trial is a real Tune trial (ASHA stops it, Tune logs it, the ResultGrid
holds it), but its MLP is one slot of a fused stack on a shared slot host.
When ASHA stops a trial its slot is freed at once and the next trial Tune
starts takes it over, so 64 trials run through 16 slots. Learning rate and
weight decay are drawn log-uniformly, the hidden size from two values (the
32-wide MLPs train zero-padded in the 128-wide stack, see
``ray_modelbatch/padded_stacks.py``), and each trial trains with AdamW under its
own warmup-cosine schedule built from its config::

    python examples/asha_sweep.py                      # 64 trials, 16 slots, max_t 20
    python examples/asha_sweep.py --trials 128 --slots 32 --max-t 30

At the end it prints which trials held each slot (the refill), the top-5
trials, and the host's busy fraction; with matplotlib installed it also saves
the slot timeline as a PNG next to the Tune results.

``benchmarks/tune_sweep.py`` imports the pieces below (data, model, search
space, scheduler) to run this very sweep against one process per trial.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.sample import Domain
from torch import nn

import ray_modelbatch
from ray_modelbatch.optim import schedules
from ray_modelbatch.tune import SweepProgress, batched_trainable

from digits_cnn import DigitsCNN  # examples/digits_cnn.py: the model of config["arch"] == "cnn"

HIDDEN = (32, 128)  # two widths: the 32-wide models join the 128-wide stack, zero-padded
BATCH_SIZE = 64
STEPS_PER_REPORT = 22  # fused steps per Tune iteration: one epoch of the 1,437 training rows
VAL_FRACTION = 0.2
DATA_SEED = 0
MIN_LR_RATIO = 0.05


# ---------------------------------------------------------------- the problem
def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits scaled to [0, 1]; a fixed 80/20 train/validation split (no download)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(DATA_SEED))
    n_val = int(x.shape[0] * VAL_FRACTION)
    val, train = perm[:n_val], perm[n_val:]
    return x[train], y[train], x[val], y[val]


def make_model(config: dict) -> nn.Module:
    if config.get("arch") == "cnn":
        return DigitsCNN(config["hidden"] // 8)  # 4 or 16 channels
    return nn.Sequential(nn.Linear(64, config["hidden"]), nn.ReLU(), nn.Linear(config["hidden"], 10))


def optimizer_hparams(config: dict) -> dict:
    """AdamW keywords of one trial, with its warmup-cosine schedule, all from its config."""
    return {
        "lr": config["lr"],
        "weight_decay": config["wd"],
        "schedule": schedules.warmup_cosine(config["total_steps"], config["warmup_steps"], MIN_LR_RATIO),
    }


def search_space(max_t: int) -> dict:
    total = max_t * STEPS_PER_REPORT
    return {
        "lr": tune.loguniform(1e-4, 3e-2),
        "wd": tune.loguniform(1e-5, 1e-1),
        "hidden": tune.choice(list(HIDDEN)),
        "warmup_steps": tune.randint(0, total // 10 + 1),
        "total_steps": total,  # the schedule spans the longest a trial may run
        "seed": tune.randint(0, 2**31 - 1),  # model init and batch order of the trial
    }


def sample_configs(space: dict, n: int, seed: int) -> list[dict]:
    """Draw ``n`` configs from ``space`` up front, so every run of this sweep trains the same trials."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cfg = {}
        for k, v in space.items():
            if isinstance(v, Domain):
                value = v.sample(random_state=rng)
                cfg[k] = value.item() if hasattr(value, "item") else value
            else:
                cfg[k] = v
        out.append(cfg)
    return out


def asha(max_t: int, grace_period: int, reduction_factor: int) -> ASHAScheduler:
    return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor)


def make_trainable(slots: int, **options: Any) -> Any:
    """The sweep's trainable; ``options`` go to ``batched_trainable`` (the benchmark sets ``host_threads``)."""
    # On a GPU, one host unless a benchmark plans one per GPU; on a CPU node the library's plan
    # (cpu_hosts_per_node="auto": a second host once the first finds its steps kernel-bound).
    options = {"num_hosts": 1 if options.get("device") == "cuda" else None, **options}
    return batched_trainable(
        model=make_model,
        optimizer=ray_modelbatch.optim.AdamW,
        hparams=optimizer_hparams,
        loss=nn.functional.cross_entropy,
        data=load_digits_split,
        metrics={"acc": ray_modelbatch.metrics.accuracy},
        batch_size=BATCH_SIZE,
        steps_per_report=STEPS_PER_REPORT,
        slots_per_host=slots,
        **options,
    )


# ------------------------------------------------------------- slot timeline
class SlotTimeline(tune.Callback):
    """Which trial held which slot, and when: recorded from the trials' own results in the driver."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.trials: dict[str, dict] = {}  # trial_id -> stack, slot, start, end, iterations

    def setup(self, **info: Any) -> None:
        self.t0 = time.monotonic()  # the experiment starts

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trials.setdefault(trial.trial_id, {"start": time.monotonic() - self.t0})

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        rec = self.trials.setdefault(trial.trial_id, {"start": time.monotonic() - self.t0})
        if "slot" in result:
            rec["stack"], rec["slot"], rec["hidden"] = result["stack"], int(result["slot"]), trial.config.get("hidden")
        rec["iterations"] = int(result["training_iteration"])
        rec["end"] = time.monotonic() - self.t0

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.trials:
            self.trials[trial.trial_id]["end"] = time.monotonic() - self.t0

    def by_slot(self) -> dict[tuple[str, int], list[tuple[str, dict]]]:
        """``{(stack, slot): [(trial_id, record), ...]}`` in the order the trials took the slot."""
        out: dict[tuple[str, int], list[tuple[str, dict]]] = {}
        for tid, rec in self.trials.items():
            if "slot" in rec:
                out.setdefault((rec["stack"], rec["slot"]), []).append((tid, rec))
        for v in out.values():
            v.sort(key=lambda p: p[1]["start"])
        return dict(sorted(out.items()))

    def report(self, width: int = 60) -> str:
        """One line per slot: a bar over the sweep's training time (one letter per trial) and the trial IDs."""
        slots = self.by_slot()
        if not slots:
            return "no trial reported a slot"
        first = min(rec["start"] for rec in self.trials.values())
        last = max(rec.get("end", rec["start"]) for rec in self.trials.values())
        span = max(last - first, 1e-6)
        stacks = {s: chr(ord("A") + i) for i, s in enumerate(sorted({k[0] for k in slots}))}
        hidden = {k[0]: held[0][1].get("hidden") for k, held in slots.items()}
        lines = [
            "stacks: " + ", ".join(f"{c} = {s} (hidden {hidden[s]})" for s, c in stacks.items()),
            f"bar: {width} columns from the first trial's start ({first:.1f}s into the sweep) to the last "
            f"trial's end ({last:.1f}s); one letter per trial that held the slot, '.' = free",
            "the trials that held the slot, in order (iterations each ran before ASHA stopped it or max_t):",
        ]
        for (stack, slot), held in slots.items():
            bar = ["."] * width
            for n, (_, rec) in enumerate(held):
                a = int((rec["start"] - first) / span * width)
                b = max(a + 1, math.ceil((rec.get("end", last) - first) / span * width))
                bar[a:min(b, width)] = "abcdefghijklmnopqrstuvwxyz"[n % 26] * (min(b, width) - a)
            ids = " ".join(f"{short_id(tid)}({rec.get('iterations', 0)})" for tid, rec in held)
            lines.append(f"{stacks[stack]}{slot:<3d}|{''.join(bar)}| {len(held):>2}: {ids}")
        return "\n".join(lines)

    def plot(self, path: str) -> bool:
        """Save the timeline as a PNG if matplotlib is importable; returns whether it did."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        slots = self.by_slot()
        fig, ax = plt.subplots(figsize=(10, 0.3 * len(slots) + 1.5))
        for row, ((stack, slot), held) in enumerate(slots.items()):
            for n, (tid, rec) in enumerate(held):
                ax.barh(row, rec.get("end", rec["start"]) - rec["start"], left=rec["start"],
                        color=f"C{n % 10}", edgecolor="k", linewidth=0.3)
        ax.set_yticks(range(len(slots)), [f"{stack[-8:]}:{slot}" for stack, slot in slots])
        ax.set_xlabel("seconds since the sweep started")
        ax.set_title(f"{len(self.trials)} trials through {len(slots)} slots")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return True


def short_id(trial_id: str) -> str:
    """Tune's trial IDs are ``<experiment>_<NNNNN>``: the number is what tells trials apart."""
    return trial_id.rsplit("_", 1)[-1]


def lost_slot_state(results: tune.ResultGrid) -> list[str]:
    """Trials whose slot did not carry exactly their own steps (a slot reset or lost under the trial).

    A slot counts its optimizer steps; a trial that kept its slot (or restored its
    checkpoint into a new one) reports ``slot_steps == training_iteration * steps_per_report``
    at every iteration.
    """
    bad = []
    for r in results:
        df = r.metrics_dataframe
        if df is None or "slot_steps" not in df:
            continue
        if (df["slot_steps"] != df["training_iteration"] * STEPS_PER_REPORT).any():
            bad.append(short_id(df["trial_id"].iloc[0]))
    return bad


def top_table(results: tune.ResultGrid, k: int = 5) -> str:
    """The ``k`` trials with the lowest validation loss, each at its best report ("at it": that report's
    iteration; the slot timeline shows how many iterations each trial ran)."""
    df = results.get_dataframe(filter_metric="val_loss", filter_mode="min").sort_values("val_loss")
    rows = [f"{'trial':>6} {'hidden':>6} {'lr':>9} {'wd':>9} {'warmup':>6} {'at it':>5} {'val_loss':>8} {'val_acc':>7}"]
    for _, r in df.head(k).iterrows():
        rows.append(f"{short_id(r['trial_id']):>6} {int(r['config/hidden']):>6} {r['config/lr']:>9.2e} "
                    f"{r['config/wd']:>9.2e} {int(r['config/warmup_steps']):>6} {int(r['training_iteration']):>5} "
                    f"{r['val_loss']:>8.4f} {r['val_acc']:>7.4f}")
    return "\n".join(rows)


def init_ray(num_cpus: int | None) -> bool:
    """Start a local Ray if none is running; returns whether we started it (and so must stop it)."""
    if ray.is_initialized():
        return False
    ray.init(num_cpus=num_cpus or os.cpu_count() or 2, include_dashboard=False, logging_level="WARNING")
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trials", type=int, default=64, help="Tune trials (configs drawn up front)")
    p.add_argument("--slots", type=int, default=16, help="slots of the one host (trials trained at once)")
    p.add_argument("--max-t", type=int, default=20, help=f"most Tune iterations per trial ({STEPS_PER_REPORT} steps each)")
    p.add_argument("--grace", type=int, default=2, help="ASHA grace period (iterations)")
    p.add_argument("--reduction", type=int, default=3, help="ASHA reduction factor")
    p.add_argument("--seed", type=int, default=0, help="seed of the config draw")
    p.add_argument("--storage", default="./runs", help="RunConfig storage_path")
    p.add_argument("--name", default="asha_sweep", help="the experiment's name (its folder under --storage)")
    p.add_argument("--no-reuse-actors", action="store_true",
                   help="start a new trial actor for every trial instead of reusing stopped trials' actors")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray; None: os.cpu_count()")
    args = p.parse_args()

    t_start = time.monotonic()
    started_ray = init_ray(args.num_cpus)
    T = make_trainable(args.slots)
    try:
        configs = sample_configs(search_space(args.max_t), args.trials, args.seed)
        timeline = SlotTimeline()
        tuner = tune.Tuner(
            T,
            param_space=search_space(args.max_t),
            tune_config=tune.TuneConfig(
                metric="val_loss",
                mode="min",
                num_samples=args.trials,
                # An explicit generator ignores TuneConfig(max_concurrent_trials=...) in Ray 2.60:
                # the slot cap goes to the generator itself.
                search_alg=BasicVariantGenerator(points_to_evaluate=configs, max_concurrent=T.max_concurrent()),
                scheduler=asha(args.max_t, args.grace, args.reduction),
                # A stopped trial's process is handed to the next trial (reset_config moves it to the
                # freed slot) instead of Tune starting a new process per trial: the refill takes milliseconds.
                # (ASHA only stops trials. With pauses, as in PBT, see pbt_sweep.py; the slot-integrity
                # check below would show a slot reset under a running trial.)
                reuse_actors=not args.no_reuse_actors,
            ),
            run_config=tune.RunConfig(
                name=args.name,
                storage_path=os.path.abspath(args.storage),
                callbacks=[timeline, SweepProgress(T)],  # one line of progress every 5 s
                verbose=0,
            ),
        )
        t_fit = time.monotonic()
        results = tuner.fit()
        fit_s = time.monotonic() - t_fit
        hosts = T.host_stats()  # before the hosts stop
    finally:
        T.shutdown_hosts()
        if started_ray:
            ray.shutdown()

    errors = [r for r in results if r.error is not None]
    lost = lost_slot_state(results)
    slots = timeline.by_slot()
    iters = sum(rec.get("iterations", 0) for rec in timeline.trials.values())
    per_stack = {}
    for stack, _ in slots:
        per_stack[stack] = per_stack.get(stack, 0) + 1
    print(f"\n{len(results)} trials through {args.slots} slots on 1 host ({len(errors)} errored): the host's "
          f"{len(per_stack)} stacks used " + " + ".join(str(n) for n in per_stack.values())
          + f" slot positions, at most {args.slots} at a time")
    (stack, slot), held = max(slots.items(), key=lambda kv: len(kv[1]))
    print(f"e.g. slot {slot} of stack {stack} held trials {', '.join(short_id(t) for t, _ in held)}")
    print(f"{iters} Tune iterations = {iters * STEPS_PER_REPORT} slot-steps of the "
          f"{args.trials * args.max_t * STEPS_PER_REPORT} a full run of every trial would take (ASHA stopped the rest)")
    print("\nSlot timeline:")
    print(timeline.report())
    print(f"\nTop 5 of {len(results)} trials by validation loss:")
    print(top_table(results))
    best = results.get_best_result(metric="val_loss", mode="min", scope="all")
    print(f"\nbest trial {short_id(best.metrics['trial_id'])}: config "
          + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.config.items()))
    for h in hosts:
        print(f"host {h['host']}: busy {h['busy_fraction']:.1%} of {h['wall_s']:.1f}s "
              f"({h['busy_s']:.1f}s in {h['fused_steps']} fused steps = {h['slot_steps']} slot-steps, "
              f"{h['slot_steps'] / max(h['fused_steps'], 1):.1f} slots per fused step, "
              f"{h['stepped_fraction']:.0%} of the slots held; run-ahead {h['run_ahead']} iterations, "
              f"{h['threads']} threads)")
    png = os.path.join(os.path.abspath(args.storage), args.name, "slot_timeline.png")
    if timeline.plot(png):
        print(f"timeline plot: {png}")
    print(f"time: fit {fit_s:.1f}s, total {time.monotonic() - t_start:.1f}s; results in "
          f"{os.path.join(os.path.abspath(args.storage), args.name)}")
    print(f"slot integrity: every result had slot_steps == iteration x {STEPS_PER_REPORT}" if not lost else
          f"WARNING: {len(lost)} trials' slots lost their state mid-trial: {', '.join(lost)}")
    if errors or lost:
        raise SystemExit(f"{len(errors)} trials errored, {len(lost)} lost slot state"
                         + (f"; e.g. {errors[0].error!r}" if errors else ""))


if __name__ == "__main__":
    main()
