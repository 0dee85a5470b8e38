"""Data pipeline: the cost of one fused step's batch fetch, per kind of per-slot stream.

For 16 slots of batch 32 (one ``next_batch`` of every slot = 512 examples),
times the fetch of:

* ``PerSlotStreams``: tensors in (device) memory, one gather per tensor: the baseline;
* ``HostTensorStreams``: tensors in host memory, gathered there, copied to the device;
* ``DatasetStreams``: a map-style ``TensorDataset`` read one example at a time,
  without a transform, with a per-example random crop + flip drawn from the
  example's generator, the same crop + flip drawing from the global RNG
  (torchvision style), and the generator transform on 2 worker threads.

Two data sets: digits (``sklearn.datasets.load_digits``, 1797 x 64, cropped as
8 x 8 images with 1 pixel of padding) and a synthetic 28 x 28 one (10000 x 1 x
28 x 28, 2 pixels of padding). Each figure is the median over ``--repeats``
runs (taken round-robin over the streams) of the mean time of at least
``--steps`` fetches and about 0.2 s, after a warm-up; the ratio is
against ``PerSlotStreams`` on the same data. On a CPU "device" there is no
host-to-device copy, so ``HostTensorStreams`` costs what the gather costs.

    python benchmarks/data_pipeline.py
    python benchmarks/data_pipeline.py --threads 1
    python benchmarks/data_pipeline.py --steps 50 --repeats 5 --device cuda

Appends nothing by itself: copy the printed markdown into RESULTS.md.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ray_modelbatch.data import PerSlotStreams
from ray_modelbatch.dataset_streams import DatasetStreams, HostTensorStreams


class CropFlip:
    """Random crop (after zero padding) and horizontal flip of one example, from the example's generator."""

    def __init__(self, shape: tuple[int, ...], pad: int):
        self.shape, self.pad = shape, pad

    def augment(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        h, w = self.shape[-2:]
        img = F.pad(x.view(self.shape), (self.pad,) * 4)
        i, j = torch.randint(0, 2 * self.pad + 1, (2,), generator=generator).tolist()
        out = img[..., i:i + h, j:j + w]
        if torch.rand((), generator=generator) < 0.5:
            out = out.flip(-1)
        return out.reshape(x.shape)

    def __call__(self, sample: tuple, generator: torch.Generator) -> tuple:
        x, y = sample
        return self.augment(x, generator), y


class GlobalCropFlip(CropFlip):
    """The same augmentation, torchvision style: ``transform(x)`` drawing from torch's global RNG."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.augment(x, None)


def datasets() -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...], int]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    digits = (torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long), (8, 8), 1)
    g = torch.Generator().manual_seed(0)
    synth = (torch.rand(10000, 1, 28, 28, generator=g), torch.randint(0, 10, (10000,), generator=g), (1, 28, 28), 2)
    return {"digits 1797x64": digits, "synthetic 10000x1x28x28": synth}


def variants(x: torch.Tensor, y: torch.Tensor, shape: tuple[int, ...], pad: int, batch: int, seeds: list[int],
             device: torch.device) -> dict[str, Callable[[], Any]]:
    ds = TensorDataset(x, y)
    return {
        "PerSlotStreams (in memory)": lambda: PerSlotStreams(x, y, batch, seeds, device=device),
        "HostTensorStreams": lambda: HostTensorStreams(x, y, batch, seeds, device=device),
        "DatasetStreams": lambda: DatasetStreams(ds, batch, seeds, device=device),
        "DatasetStreams + crop/flip": lambda: DatasetStreams(ds, batch, seeds, device=device,
                                                             transform=CropFlip(shape, pad)),
        "DatasetStreams + crop/flip, global RNG": lambda: DatasetStreams(ds, batch, seeds, device=device,
                                                                         transform=GlobalCropFlip(shape, pad)),
        "DatasetStreams + crop/flip, 2 workers": lambda: DatasetStreams(ds, batch, seeds, device=device,
                                                                        transform=CropFlip(shape, pad), num_workers=2),
    }


def time_fetches(makers: dict[str, Callable[[], Any]], slots: list[int], steps: int, repeats: int,
                 device: torch.device, min_seconds: float = 0.2) -> dict[str, float]:
    """Median over ``repeats`` of the mean seconds per ``next_batch(slots)``, for each stream.

    The repeats go round the streams (stream 1, 2, ..., then 1, 2, ... again),
    so that a neighbour's load on a shared machine falls on all of them
    alike. Each repeat runs at least ``steps`` fetches and at least about
    ``min_seconds`` (fast streams run more fetches, for the timer's sake).
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    streams, counts = {}, {}
    for label, make in makers.items():
        s = streams[label] = make()
        for _ in range(2):
            s.next_batch(slots)
        t0 = time.perf_counter()
        s.next_batch(slots)
        sync()
        counts[label] = max(steps, math.ceil(min_seconds / max(time.perf_counter() - t0, 1e-9)))
    times: dict[str, list[float]] = {label: [] for label in makers}
    for _ in range(repeats):
        for label, s in streams.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(counts[label]):
                s.next_batch(slots)
            sync()
            times[label].append((time.perf_counter() - t0) / counts[label])
    for s in streams.values():
        if hasattr(s, "close"):
            s.close()
    return {label: statistics.median(t) for label, t in times.items()}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="fetches per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's). On a loaded 2-core machine a parallel "
                         "gather waits for a descheduled thread: try 1")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    seeds = list(range(args.slots))
    slots = list(range(args.slots))
    print(f"`python {shlex.join(['benchmarks/data_pipeline.py', *sys.argv[1:]])}`: {cpu_name()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), device "
          f"{device}; {args.slots} slots x batch {args.batch} per fetch, median of {args.repeats} "
          f"round-robin repeats of >= {args.steps} fetches.\n")
    print("| data | stream | ms / fetch | us / example | vs in memory |")
    print("|---|---|---:|---:|---:|")
    for name, (x, y, shape, pad) in datasets().items():
        timed = time_fetches(variants(x, y, shape, pad, args.batch, seeds, device), slots, args.steps,
                             args.repeats, device)
        base = next(iter(timed.values()))
        for label, t in timed.items():
            per_ex = t / (args.slots * args.batch) * 1e6
            print(f"| {name} | {label} | {t * 1e3:.3f} | {per_ex:.2f} | {t / base:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
