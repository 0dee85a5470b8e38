"""A CIFAR-style CNN on RGB images, each slot on its own batches (as a sweep trains): fused step against a loop.

Why: every other family in ``fused_step.py`` reads one batch shared by all
slots, and 1-channel images. A sweep's slots each draw their own batches, so a
fused CNN's first layer is a grouped convolution with the images' channels
per group; with 3 (RGB) oneDNN's weight gradient for it is 3-5x slower than
with 4 (see ``ray_modelbatch/padded_channel_conv.py``). This times, alternating
in one process, one training step (Adam) of S such models:

* ``fused``: ``FusedEngine.train_step(x, y, per_slot=True)`` as the library runs it;
* ``fused, torch's kernel``: the same with the first layer's weight gradient
  left to oneDNN's 3-channel kernel (``padded_channel_conv`` switched off);
* ``loop``: each ``nn.Module`` with its own ``torch.optim.Adam`` on its own batch.

and prints medians over ``--rounds`` rounds, the ratios, and how far the fused
slots' weights are from the loop's after 3 SGD steps on the same batches
(fresh models, apart from the timing; see :func:`rel_diffs`)::

    python benchmarks/rgb_cnn.py
    python benchmarks/rgb_cnn.py --slots 8,32 --rounds 7 --channels 3,1
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import padded_channel_conv

BATCH, SIDE = 64, 32


class RGBNet(nn.Module):
    """conv(C->16)-BN-ReLU-pool, conv(16->32)-BN-ReLU-pool, linear: a small CIFAR-10 model (no conv bias before
    a BatchNorm: its gradient is zero but for rounding, which Adam's first steps blow up to lr)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Linear(32 * (SIDE // 4) ** 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def timed(step: Callable[[], None], reps: int) -> float:
    """Median seconds per call of ``reps`` calls, after one untimed call."""
    step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(slots: int, channels: int, optimizer: str = "Adam",
          lr: float = 1e-3) -> tuple[rmb.FusedEngine, list[nn.Module], list[torch.optim.Optimizer]]:
    """S models (seeded), stacked with ``optimizer``, and a copy of each with its own ``torch.optim`` one."""
    torch.manual_seed(0)
    models = [RGBNet(channels) for _ in range(slots)]
    loop_models = copy.deepcopy(models)
    mb = rmb.ModelBatch(models)
    engine = rmb.FusedEngine(mb, getattr(rmb.optim, optimizer)(mb, lr=lr), F.cross_entropy)
    return engine, loop_models, [getattr(torch.optim, optimizer)(m.parameters(), lr=lr) for m in loop_models]


def loop_step(models: list[nn.Module], opts: list, x: torch.Tensor, y: torch.Tensor) -> None:
    for m, o, xs, ys in zip(models, opts, x, y):
        o.zero_grad()
        F.cross_entropy(m(xs), ys).backward()
        o.step()


def rel_diffs(slots: int, channels: int, steps: int = 3) -> list[float]:
    """Per slot, after ``steps`` SGD steps on the same batches from the same weights: the largest difference
    of a fused slot's tensor from its model's in the loop, relative to the tensor's largest value.

    SGD, not Adam: Adam's first steps move a weight by about lr whatever its
    gradient, so a gradient that is zero but for rounding moves it by lr in
    one and not in the other. A max-pool is discontinuous: where two values of
    a window are within rounding of each other, the fused slot and its model
    can pick different winners, and that slot's gradients then differ by far
    more than rounding (each pick is right to fp32); hence the median over
    slots beside the largest.
    """
    engine, models, opts = build(slots, channels, "SGD", 0.05)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(slots, BATCH, channels, SIDE, SIDE, generator=g)
        y = torch.randint(0, 10, (slots, BATCH), generator=g)
        engine.train_step(x, y, per_slot=True)
        loop_step(models, opts, x, y)
    return [max((engine.mb.slot_state(i)[k] - v).abs().max().item() / max(v.abs().max().item(), 1e-12)
                for k, v in m.state_dict().items() if v.is_floating_point()) for i, m in enumerate(models)]


def compare(slots: int, channels: int, rounds: int, reps: int) -> dict:
    engine, models, opts = build(slots, channels)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(slots, BATCH, channels, SIDE, SIDE, generator=g)
    y = torch.randint(0, 10, (slots, BATCH), generator=g)
    applies = padded_channel_conv.applies

    def fused(padded: bool) -> Callable[[], None]:
        def step() -> None:
            padded_channel_conv.applies = applies if padded else (lambda *a, **k: False)
            try:
                engine.train_step(x, y, per_slot=True)
            finally:
                padded_channel_conv.applies = applies
        return step

    ways = {"fused": fused(True), "torch_kernel": fused(False), "loop": lambda: loop_step(models, opts, x, y)}
    times: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(rounds):
        for name in (list(ways) if r % 2 == 0 else list(reversed(ways))):
            times[name].append(timed(ways[name], reps))
    med = {k: statistics.median(v) for k, v in times.items()}
    diffs = rel_diffs(slots, channels)
    return {"slots": slots, "channels": channels, **med, "diff": statistics.median(diffs), "worst": max(diffs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slots", default="8,16,32")
    ap.add_argument("--channels", default="3,1", help="image channels (3: RGB; 1: the grayscale control)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are reported")
    ap.add_argument("--reps", type=int, default=3, help="timed steps of each way per round")
    args = ap.parse_args()
    rows = [compare(s, c, args.rounds, args.reps) for c in map(int, args.channels.split(","))
            for s in map(int, args.slots.split(","))]
    print(f"# RGB CNN, each slot on its own batches ({BATCH} images of {SIDE}x{SIDE}), one Adam step\n")
    print(f"- command: `python benchmarks/rgb_cnn.py {' '.join(sys.argv[1:])}`".rstrip())
    print(f"- machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; medians of {args.rounds} alternating rounds of {args.reps} steps\n")
    print("| channels | S | fused ms | fused, torch's kernel ms | loop ms | fused / loop | torch's kernel / loop "
          "| rel diff to the loop after 3 SGD steps: median slot (worst) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['channels']} | {r['slots']} | {r['fused'] * 1e3:.1f} | {r['torch_kernel'] * 1e3:.1f} "
              f"| {r['loop'] * 1e3:.1f} | {r['loop'] / r['fused']:.2f}x | {r['loop'] / r['torch_kernel']:.2f}x "
              f"| {r['diff']:.1e} ({r['worst']:.1e}) |")


if __name__ == "__main__":
    main()
