"""The cost of parameter groups in the fused optimizer update.

A 784-256-256-10 MLP stacked S times (S=32 by default); each optimizer's
``step()`` timed without groups and with the transformer recipe as groups
(biases: no weight decay and their own lr multiplier, both per slot). With
groups, the coefficients that involve lr or weight decay are picked per
column of the flat ``[S, P]`` buffer from a per-group table (one
``index_select`` per buffer and cache tile) instead of broadcast from
``[S, 1]`` columns; see :mod:`ray_modelbatch.optim.groups`. Also times a
whole training step (forward, backward, update) for scale. Prints
medians of repeats::

    python benchmarks/optim_param_groups.py
    python benchmarks/optim_param_groups.py --threads 1 --optimizers SGD AdamW --compile
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from batch_size_stacks import timed  # the median-of-repeats timer the benchmarks share


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def build(name: str, slots: int, groups: bool, compile: bool = False) -> tuple[rmb.ModelBatch, object]:
    torch.manual_seed(0)
    mb = rmb.ModelBatch([mlp() for _ in range(slots)])
    kw = dict(lr=torch.linspace(1e-3, 1e-2, slots), weight_decay=0.01, compile=compile)
    if name == "SGD":
        kw["momentum"] = 0.9
    if groups:
        kw["param_groups"] = [{"params": lambda n, p: p.ndim < 2, "weight_decay": 0.0,
                               "lr_scale": torch.linspace(0.1, 1.0, slots)}]
    return mb, getattr(rmb.optim, name)(mb, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--optimizers", nargs="+", default=["SGD", "Adam", "AdamW", "NAdam"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--compile", action="store_true", help="compile=True: the update as one fused pass")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    print(f"MLP 784-256-256-10, S={args.slots}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'compiled' if args.compile else 'eager'} update; median ms")
    print("| optimizer | step() no groups | step() with groups | ratio | train step no groups | with groups |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in args.optimizers:
        row = []
        for what in ("step", "train"):
            for groups in (False, True):
                mb, opt = build(name, args.slots, groups, args.compile)
                mb.sync_grads()
                mb.groups[torch.float32].grad.normal_()
                if what == "step":
                    row.append(timed(opt.step, args.repeats, args.inner))
                else:
                    engine = rmb.FusedEngine(mb, opt, F.cross_entropy)
                    row.append(timed(lambda: engine.train_step(x, y), args.repeats, args.inner))
        s0, s1, t0, t1 = (1e3 * v for v in row)
        print(f"| {name} | {s0:.2f} | {s1:.2f} | {s1 / s0:.2f}x | {t0:.2f} | {t1:.2f} |")


if __name__ == "__main__":
    main()
