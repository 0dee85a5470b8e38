"""The second moments' root with zeros clamped (``ray_modelbatch/optim/moment_sqrt.py``) against torch's ``sqrt``.

Why: torch's CPU ``sqrt`` is slow on exact zeros, and second moments hold
them wherever a gradient has always been 0 (embedding rows never looked up,
inputs that are always 0, a fresh trial's state). The optimizers clamp the
root's zeros, bit for bit, while at least 2% of the moments are zeros. This
times each case both ways, alternating in one process, and checks that both
ways leave the same parameters:

* ``embedding``: an optimizer's update alone on a stack of
  ``nn.Embedding(2000, 64)`` + ``nn.Linear(64, 10)`` models whose gradients
  are 0 on half of the table's rows (never looked up), for Adagrad, RMSprop,
  NAdam and RAdam (Adam and AdamW take torch's single-pass kernel at this size);
* ``sweep MLP``: the example sweep's fused step (digits MLP, AdamW, 8 slots,
  evaluation included), as ``benchmarks/group_step.py`` builds it;
* ``tiny MLP``: ``fused_step.py``'s tiny MLP on a shared batch, Adam, whose
  dead ReLU units leave too few zeros for the clamp (it stays off).

    python benchmarks/moment_sqrt.py
    python benchmarks/moment_sqrt.py --rounds 3 --slots 8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from ray_modelbatch import FusedEngine, ModelBatch, optim  # noqa: E402

import fused_step  # noqa: E402
import group_step  # noqa: E402


def _plain(opt: optim.VectorOptimizer) -> None:
    """Torch's own ``sqrt`` throughout: the clamp neither allowed nor on."""
    opt._sqrt_allowed = []
    opt._sqrt_clamp = {dt: False for dt in opt._sqrt_clamp}


Case = tuple[dict[str, Callable[[], None]], Callable[[], bool], optim.VectorOptimizer]
"""Each way's timed call, whether both ways' parameters are equal, and the clamped way's optimizer."""


def embedding_case(cls: type, slots: int) -> Case:
    """Each way's update on its own stack, with the same gradients every call."""
    g = torch.Generator().manual_seed(1)
    stacks = {}
    for way in ("clamp", "plain"):
        torch.manual_seed(0)
        mb = ModelBatch([nn.Sequential(nn.Embedding(2000, 64), nn.Linear(64, 10)) for _ in range(slots)])
        opt = cls(mb, lr=1e-3)
        if way == "plain":
            _plain(opt)
        stacks[way] = (mb, opt)
    grads = {dt: torch.randn(p.data.shape, generator=g) * 1e-3 for dt, p in stacks["clamp"][0].groups.items()}
    for grad in grads.values():
        grad[:, 64000:128000] = 0  # the table's rows 1000-1999, never looked up

    def step(mb: ModelBatch, opt: optim.VectorOptimizer) -> None:
        for dt, p in mb.groups.items():
            p.grad = grads[dt].clone()
        opt.step()

    return ({way: (lambda s=s: step(*s)) for way, s in stacks.items()},
            lambda: torch.equal(*(s[0].groups[torch.float32].data for s in stacks.values())), stacks["clamp"][1])


def sweep_case(hidden: int) -> Case:
    built = {"clamp": group_step.build(hidden), "plain": group_step.build(hidden)}
    _plain(built["plain"][0].opt)
    return ({way: (lambda b=b: group_step.per_step_ms(*b, 1)) for way, b in built.items()},
            lambda: torch.equal(*(b[0].mb.groups[torch.float32].data for b in built.values())), built["clamp"][0].opt)


def tiny_case(slots: int) -> Case:
    spec = fused_step.SPECS["mlp_tiny"]
    x, y = spec.batch(torch.Generator().manual_seed(0))
    engines = {}
    for way in ("clamp", "plain"):
        torch.manual_seed(0)
        mb = ModelBatch([spec.make() for _ in range(slots)])
        opt = optim.Adam(mb, lr=1e-3)
        if way == "plain":
            _plain(opt)
        engines[way] = FusedEngine(mb, opt, spec.loss_fn)

    def steps(e: FusedEngine) -> None:
        for _ in range(22):
            e.train_step(x, y)

    return ({way: (lambda e=e: steps(e)) for way, e in engines.items()},
            lambda: torch.equal(*(e.mb.groups[torch.float32].data for e in engines.values())),
            engines["clamp"].optimizer)


def timed(ways: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each way, the ways alternating."""
    for f in ways.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(rounds):
        for k, f in ways.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--slots", type=int, default=32, help="slots of the embedding and tiny-MLP stacks")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [(f"{cls.__name__}, embedding stack, half its rows never looked up", "update",
              lambda cls=cls: embedding_case(cls, args.slots))
             for cls in (optim.Adagrad, optim.RMSprop, optim.NAdam, optim.RAdam)]
    cases += [(f"the sweep's MLP stack, hidden {h}, 8 slots", "22 fused steps and the evaluation",
               lambda h=h: sweep_case(h)) for h in (32, 128)]
    cases += [(f"tiny MLP, {args.slots} slots, shared batch", "22 fused steps", lambda: tiny_case(args.slots))]
    print(f"# The second moments' root: zeros clamped against torch's sqrt ({args.threads} thread(s))\n")
    print(f"- command: `python benchmarks/moment_sqrt.py {' '.join(sys.argv[1:])}`".rstrip())
    print(f"- machine: {platform.processor() or platform.machine()}, torch {torch.__version__}; medians of "
          f"{args.rounds} alternating rounds; `clamp on` is what the optimizer chose after the run\n")
    print("| case | timed | with the clamp ms | torch's sqrt ms | gain | clamp on | same parameters |")
    print("| --- | --- | ---: | ---: | ---: | --- | --- |")
    for label, what, make in cases:
        ways, same, opt = make()
        t = timed(ways, args.rounds)
        on = "yes" if opt._sqrt_clamp.get(torch.float32) else "no"
        print(f"| {label} | {what} | {t['clamp'] * 1e3:.2f} | {t['plain'] * 1e3:.2f} | "
              f"{t['plain'] / t['clamp']:.2f}x | {on} | {'yes' if same() else 'NO'} |")


if __name__ == "__main__":
    main()
