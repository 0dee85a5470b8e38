"""The fused step of the MLP sweep with the optimizer's coefficient window and without it, side by side.

The window (``ray_modelbatch/optim/coefficient_window.py``) computes every
slot's per-step coefficients (warmup-cosine schedule, bias corrections,
skipped-slot masks) for 32 steps in one batched pass, where the per-step form
spends a few dozen small ops per fused step on them. This times the digits
sweep's step as its slot host runs it: MLP 64-H-10, AdamW with one
warmup-cosine schedule and learning rate per slot, a batch of 64 per slot
from each slot's own stream, one torch thread; every slot stepping ("all")
or two of every three ("subset", the gathered path). Blocks of 100 steps,
the two forms alternating, median of the blocks.

    python benchmarks/coefficient_window.py [--slots 8,16,32] [--hidden 32,128] [--blocks 7]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from ray_modelbatch.data import PerSlotStreams
from ray_modelbatch.engine import FusedEngine
from ray_modelbatch.model_batch import ModelBatch
from ray_modelbatch.optim import AdamW, schedules


def make_step(slots: int, hidden: int, window: bool, subset: bool):
    """One fused step of a fresh stack, as a callable."""
    torch.manual_seed(0)
    mb = ModelBatch([nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)) for _ in range(slots)])
    opt = AdamW(mb, lr=[1e-3 * (i + 1) for i in range(slots)], weight_decay=1e-4,
                schedule=[schedules.warmup_cosine(440, 10 + i, 0.05) for i in range(slots)])
    if not window:
        opt._window = None
    eng = FusedEngine(mb, opt, nn.functional.cross_entropy)
    x, y = torch.rand(1437, 64), torch.randint(0, 10, (1437,))
    streams = PerSlotStreams(x, y, 64, seeds=list(range(slots)))
    rows = [i for i in range(slots) if i % 3 != 2] if subset else list(range(slots))

    def step() -> None:
        xb, yb = streams.next_batch(rows)
        eng.train_step(xb, yb, slots=rows, per_slot=True)

    for _ in range(40):  # warm up past the first window
        step()
    return step


def block_ms(step, n: int = 100) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", default="8,16,32")
    ap.add_argument("--hidden", default="32,128")
    ap.add_argument("--blocks", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# coefficient window A/B: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"1 thread, median of {args.blocks} blocks of 100 steps\n")
    print("| hidden | S | slots stepping | window ms/step | per-step ms/step | saved ms | per-step / window |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for hidden in (int(h) for h in args.hidden.split(",")):
        for slots in (int(s) for s in args.slots.split(",")):
            for subset in (False, True):
                steps = {w: make_step(slots, hidden, w, subset) for w in (True, False)}
                times: dict[bool, list[float]] = {True: [], False: []}
                for _ in range(args.blocks):
                    for w in (True, False):
                        times[w].append(block_ms(steps[w]))
                on, off = statistics.median(times[True]), statistics.median(times[False])
                stepping = f"{sum(1 for i in range(slots) if i % 3 != 2)} (gathered)" if subset else "all"
                print(f"| {hidden} | {slots} | {stepping} | {on:.3f} | {off:.3f} | {off - on:.3f} | {off / on:.2f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
