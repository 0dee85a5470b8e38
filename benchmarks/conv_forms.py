"""One convolution layer of S stacked models, forward and backward, in each form a fused CNN could take.

Why: on a small CPU node a fused CNN competes with one-thread trials whose
convolutions are oneDNN's own, and issue 13 asks that the fused form be
chosen by measurement. The layer is the Tune CNN sweep's wider one (16 -> 32
channels, 3x3, padding 1, 8x8 images, batch 64) for S = 8 models:

* ``grouped NCHW`` / ``grouped NHWC``: one grouped convolution over the
  channel-stacked slots (the fused path's form is channels-last);
* ``per-slot``: one convolution per slot on separate tensors (what S trials do);
* ``per-slot on the stack``: the same from the stacked tensor (split, then cat);
* ``im2col + bmm``: unfold, then one batched GEMM over the slots.

Every form runs in turn, ``--rounds`` times; the table gives each one's median
and its time over the grouped NHWC form's. ``python benchmarks/conv_forms.py
--threads 1 2`` (the standard trials run with 1 thread, the host with 2 on a
2-core node).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

S, B, CI, CO, H = 8, 64, 16, 32, 8


def _median_ms(fn: Callable[[], None], n: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def forms() -> dict[str, Callable[[], None]]:
    """Each form as a closure that runs the layer's forward and backward once."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(S * CO, CI, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(S * CO, generator=g, requires_grad=True)

    def grouped(fmt: torch.memory_format) -> Callable[[], None]:
        x = torch.randn(B, S * CI, H, H, generator=g).to(memory_format=fmt).requires_grad_()
        go = torch.randn(B, S * CO, H, H, generator=g).to(memory_format=fmt)
        return lambda: torch.autograd.backward(F.conv2d(x, w, b, padding=1, groups=S), go)

    xs = [torch.randn(B, CI, H, H, generator=g, requires_grad=True) for _ in range(S)]
    ws = [wi.detach().clone().requires_grad_() for wi in w.split(CO)]
    bs = [bi.detach().clone().requires_grad_() for bi in b.split(CO)]
    gos = [torch.randn(B, CO, H, H, generator=g) for _ in range(S)]

    def per_slot() -> None:
        torch.autograd.backward([F.conv2d(x, wi, bi, padding=1) for x, wi, bi in zip(xs, ws, bs)], gos)

    xst = torch.randn(B, S * CI, H, H, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    gst = torch.randn(B, S * CO, H, H, generator=g).to(memory_format=torch.channels_last)

    def per_slot_stacked() -> None:
        outs = [F.conv2d(x, wi, bi, padding=1) for x, wi, bi in zip(xst.split(CI, dim=1), ws, bs)]
        torch.autograd.backward(torch.cat(outs, 1), gst)

    xsl = torch.randn(S, B, CI, H, H, generator=g, requires_grad=True)
    wsl = torch.randn(S, CO, CI * 9, generator=g, requires_grad=True)
    bsl = torch.randn(S, 1, CO, generator=g, requires_grad=True)
    gsl = torch.randn(S, B * H * H, CO, generator=g)

    def im2col() -> None:
        cols = F.unfold(xsl.reshape(S * B, CI, H, H), 3, padding=1)  # [S*B, CI*9, H*W]
        cols = cols.reshape(S, B, CI * 9, H * H).transpose(2, 3).reshape(S, B * H * H, CI * 9)
        torch.autograd.backward(torch.baddbmm(bsl, cols, wsl.transpose(1, 2)), gsl)

    return {"grouped NCHW": grouped(torch.contiguous_format), "grouped NHWC": grouped(torch.channels_last),
            "per-slot": per_slot, "per-slot on the stack": per_slot_stacked, "im2col + bmm": im2col}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"S={S} models, batch {B}, {CI}->{CO} channels, 3x3, {H}x{H}; torch {torch.__version__}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        fs = forms()
        runs: dict[str, list[float]] = {k: [] for k in fs}
        for _ in range(args.rounds):
            for name, fn in fs.items():
                runs[name].append(_median_ms(fn))
        base = statistics.median(runs["grouped NHWC"])
        print(f"\n{threads} thread(s): median of {args.rounds} rounds (each the median of 30 runs)")
        print("| form | fwd+bwd ms | / grouped NHWC |\n|---|---:|---:|")
        for name, ts in runs.items():
            print(f"| {name} | {statistics.median(ts):.2f} | {statistics.median(ts) / base:.2f}x |")


if __name__ == "__main__":
    main()
