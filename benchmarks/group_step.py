"""A slot host's own cost per fused step, on the MLP sweep's stacks: the hand-written MLP step against autograd.

The MLP sweep (``examples/asha_sweep.py``) trains MLPs of hidden 32 and 128
on one host thread (since session 47 in one padded stack; this times a stack
of each width), and its fused steps are mostly
fixed cost: dispatch, Python, the autograd graph. This times one
:class:`~ray_modelbatch.slot_group.SlotGroup` of 8 such slots, built from the
sweep's own configs (AdamW, warmup-cosine, per-slot streams of 64 rows), as
the host drives it: ``step()`` over every slot, ``finish()`` at the end of
each 22-step iteration. Two ways, alternating in one run:

* ``hand-written``: the library as it is (``ray_modelbatch.mlp_step`` takes
  the forward, the loss and the backward);
* ``autograd``: the same stack with that step turned off, so the direct
  path's forward and autograd's backward run, as before it existed.

Each round times ``--iterations`` iterations of each; the table gives the
median over ``--rounds`` rounds of the time per fused step (evaluation
included), on ``--threads`` torch threads (1: the host's count on a 2-core
node)::

    python benchmarks/group_step.py
    python benchmarks/group_step.py --hidden 32,128 --rounds 7
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import asha_sweep as sweep  # noqa: E402

from ray_modelbatch import metrics, optim  # noqa: E402
from ray_modelbatch.slot_group import SlotGroup, stack_key  # noqa: E402
from ray_modelbatch.tune.spec import SlotSpec  # noqa: E402

SLOTS = 8


def build(hidden: int) -> tuple[SlotGroup, list[int]]:
    """A stack of the sweep's first ``SLOTS`` configs with this hidden size, as a host builds it."""
    spec = SlotSpec(model=sweep.make_model, optimizer=optim.AdamW, hparams=sweep.optimizer_hparams,
                    loss=F.cross_entropy, data=sweep.load_digits_split, metrics={"acc": metrics.accuracy},
                    batch_size=sweep.BATCH_SIZE, steps_per_report=sweep.STEPS_PER_REPORT)
    configs = [c for c in sweep.sample_configs(sweep.search_space(20), 256, 0) if c["hidden"] == hidden][:SLOTS]
    first = sweep.make_model(configs[0])
    group = SlotGroup(spec, stack_key(first), first, sweep.load_digits_split(), SLOTS, "cpu", run_ahead=2,
                      config=configs[0])
    slots = []
    for i, c in enumerate(configs):
        torch.manual_seed(c["seed"])
        slots.append(group.add(f"t{i}", sweep.make_model(c), seed=c["seed"], hparams=sweep.optimizer_hparams(c)))
    return group, slots


def per_step_ms(group: SlotGroup, slots: list[int], iterations: int) -> float:
    steps = 0
    start = time.perf_counter()
    for _ in range(iterations):
        done: list[int] = []
        for _ in range(group.steps_per_report):
            done = group.step(slots) or done
            steps += 1
        group.finish(done)
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="32,128", help="hidden sizes of the stacks (the sweep's: 32,128)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=6, help="iterations of 22 steps per round and way")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for hidden in (int(h) for h in args.hidden.split(",")):
        ways = {"hand-written": build(hidden), "autograd": build(hidden)}
        off = ways["autograd"][0].mb
        off.mlp_train_step = lambda *a, **k: None  # the direct path and autograd, as before mlp_step
        for group, slots in ways.values():
            per_step_ms(group, slots, 2)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in ways}
        for _ in range(args.rounds):
            for name, (group, slots) in ways.items():
                times[name].append(per_step_ms(group, slots, args.iterations))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append((hidden, med["hand-written"], med["autograd"], med["autograd"] / med["hand-written"],
                     min(times["hand-written"]), max(times["hand-written"])))
    print(f"# A slot host's fused step, MLP sweep stacks ({SLOTS} slots, batch {sweep.BATCH_SIZE}, "
          f"{args.threads} thread(s))\n")
    print(f"- command: `python benchmarks/group_step.py {' '.join(sys.argv[1:])}`".rstrip())
    print(f"- machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.rounds} alternating rounds of {args.iterations} iterations x {sweep.STEPS_PER_REPORT} steps; "
          "ms per fused step, evaluation at each iteration's end included\n")
    print("| hidden | hand-written ms (median, min-max) | autograd ms (median) | autograd / hand-written |")
    print("| ---: | ---: | ---: | ---: |")
    for hidden, hand, auto, ratio, lo, hi in rows:
        print(f"| {hidden} | {hand:.3f} ({lo:.3f}-{hi:.3f}) | {auto:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
