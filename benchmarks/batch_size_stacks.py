"""Searched batch sizes: one stack per batch size (what the host does) vs one stack padded to the largest.

A sweep that searches ``batch_size`` has trials whose fused steps differ in
batch shape. Two ways to fuse them:

- **separate stacks**: one stack per batch size, each stepped on its own
  (what ``batched_trainable(batch_size=lambda c: ...)`` does);
- **padding**: one stack of every trial at the largest batch size, each
  slot's rows beyond its own batch size masked out of its loss. This
  computes every slot at the largest size, and BatchNorm would see the padded
  rows, so it is not even exact; it is timed here only as the alternative.

Prints the time per round (every trial one step), medians of repeats, and
the ratio::

    python benchmarks/batch_size_stacks.py
    python benchmarks/batch_size_stacks.py --model cnn --per-size 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb

sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/examples")
from digits_cnn import DigitsCNN  # noqa: E402


def model(kind: str) -> nn.Module:
    if kind == "cnn":
        return DigitsCNN(8)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def engine(kind: str, slots: int) -> rmb.FusedEngine:
    mb = rmb.ModelBatch([model(kind) for _ in range(slots)])
    return rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=1e-3), F.cross_entropy)


def batch(kind: str, slots: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (slots, size, 1, 8, 8) if kind == "cnn" else (slots, size, 64)
    return torch.rand(shape), torch.randint(0, 10, (slots, size))


def timed(fn, repeats: int, inner: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--sizes", default="16,32,64")
    p.add_argument("--per-size", type=int, default=8, help="trials per batch size")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--inner", type=int, default=20)
    args = p.parse_args()
    torch.manual_seed(0)
    sizes = [int(s) for s in args.sizes.split(",")]
    n = args.per_size
    stacks = [(engine(args.model, n), batch(args.model, n, b)) for b in sizes]
    padded = engine(args.model, n * len(sizes))
    pad_x, pad_y = batch(args.model, n * len(sizes), max(sizes))

    def separate() -> None:
        for e, (x, y) in stacks:
            e.train_step(x, y, per_slot=True)

    def one_padded() -> None:
        padded.train_step(pad_x, pad_y, per_slot=True)

    t_sep = timed(separate, args.repeats, args.inner)
    t_pad = timed(one_padded, args.repeats, args.inner)
    rows = n * sum(sizes)
    print(f"model {args.model}, batch sizes {sizes}, {n} trials each, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}x{args.inner} rounds")
    print(f"{'layout':<34} {'ms/round':>9} {'rows computed':>14} {'vs separate':>12}")
    print(f"{'separate stacks (one per size)':<34} {t_sep * 1e3:>9.2f} {rows:>14} {1.0:>11.2f}x")
    print(f"{'one stack padded to ' + str(max(sizes)):<34} {t_pad * 1e3:>9.2f} {n * len(sizes) * max(sizes):>14} "
          f"{t_pad / t_sep:>11.2f}x")


if __name__ == "__main__":
    main()
