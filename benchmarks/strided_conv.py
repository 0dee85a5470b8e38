"""A strided convolution's input gradient: oneDNN's strided kernel against one stride-1 convolution per phase.

Why: oneDNN computed the input gradient of the small ResNet's 3x3 stride-2
convolution (``fused_step.py --models resnet``, 32 slots, 8 -> 16 channels per
slot at 16x16) in 16.5 ms against 4.7 ms for its forward, the same products.
A stride ``s`` splits the input's positions into ``s x s`` phases (row ``y`` is
in phase ``y mod s``); the gradient at the positions of one phase is a
stride-1 convolution of the output gradient with the kernel taps that land
there (flipped, input and output channels swapped), which oneDNN runs fast:
``gx[s*i + a] = sum_d go[i - d] * w[s*d + a + p]`` along each dimension, for
padding ``p``. :func:`input_gradient` computes it that way (checked against
torch before timing). It was tried as the fused path's kernel and not
adopted: it wins at some shapes and loses up to 3-4x at others, with no rule
on channels, kernel or size that separates them (``benchmarks/RESULTS.md``,
session 31), and in the ResNet's whole step it saved 2 ms of 165.

Each form runs in turn for ``--rounds`` rounds at each shape; the table gives
the medians and their ratio. The weight gradient is not timed.

    python benchmarks/strided_conv.py
    python benchmarks/strided_conv.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ray_modelbatch.cpu_memory import keep_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conv_forms import _median_ms  # noqa: E402 - a sibling benchmark's timing


def _phases(size: int, out_size: int, k: int, s: int, p: int) -> list[tuple[int, list[int], int, int]]:
    """Along one dimension of ``size`` input positions, per phase ``a``: ``(a, taps, first, n)``.

    ``n`` positions ``a, a + s, ...`` are in the phase. ``taps`` are the kernel
    indices that land on it, in the order the phase's stride-1 convolution
    reads them, and ``first`` is the output-gradient index (may be negative:
    zero padding) its first window starts at. Position ``i`` of the phase is
    ``sum_m go[first + i + m] * w[taps[m]]``.
    """
    out = []
    for a in range(min(s, size)):
        n = -(-(size - a) // s)
        # tap s*d + a + p of the kernel (0 <= it < k) reads output row i - d for phase row i
        lo, hi = -((a + p) // s), (k - 1 - a - p) // s
        taps = [s * (hi - m) + a + p for m in range(hi - lo + 1)]  # empty where hi < lo
        out.append((a, taps, -hi if taps else 0, n))
    return out


def input_gradient(go: torch.Tensor, weight: torch.Tensor, x_shape: Sequence[int], stride: tuple[int, int],
                   padding: tuple[int, int], groups: int) -> torch.Tensor:
    """The input gradient of ``F.conv2d(x, weight, None, stride, padding, 1, groups)`` for the output
    gradient ``go``, channels-last, phase by phase (see the module docstring)."""
    b, c, h, w = x_shape
    o, ci, kh, kw = weight.shape
    co = o // groups
    rows = _phases(h, go.shape[2], kh, stride[0], padding[0])
    cols = _phases(w, go.shape[3], kw, stride[1], padding[1])
    live_r, live_c = [r for r in rows if r[1]], [q for q in cols if q[1]]
    # zero padding around the output gradient that every phase's windows stay inside
    top = max([-first for _, _, first, _ in live_r] + [0])
    left = max([-first for _, _, first, _ in live_c] + [0])
    bottom = max([first + n + len(t) - 1 - go.shape[2] for _, t, first, n in live_r] + [0])
    right = max([first + n + len(t) - 1 - go.shape[3] for _, t, first, n in live_c] + [0])
    padded = F.pad(go, (left, right, top, bottom)) if top or bottom or left or right else go
    # [groups*C_in/groups, O/groups, kh, kw]: the transposed direction's grouped weight (slot g stays group g)
    flipped = weight.view(groups, co, ci, kh, kw).transpose(1, 2)
    gx = torch.empty(b, c, h, w, dtype=go.dtype, device=go.device, memory_format=torch.channels_last)
    for a, ty, r0, nr in rows:
        for bb, tx, c0, nc in cols:
            phase = gx[:, :, a::stride[0], bb::stride[1]]
            if not ty or not tx:  # no tap lands on these positions: the input there never reached the output
                phase.zero_()
                continue
            sub = flipped[:, :, :, ty][:, :, :, :, tx].reshape(groups * ci, co, len(ty), len(tx))
            window = padded[:, :, r0 + top:r0 + top + nr + len(ty) - 1, c0 + left:c0 + left + nc + len(tx) - 1]
            phase.copy_(F.conv2d(window, sub.contiguous(memory_format=torch.channels_last), None, 1, 0, 1, groups))
    return gx


# (slots, batch, channels in and out per slot, size, kernel): stride 2, padding kernel // 2. The small
# ResNet's layer first, then a grid over channels, sizes and kernels.
SHAPES = [(32, 64, 8, 16, 16, 3)] + [(16, 32, ci, co, size, k) for k in (3, 5)
                                     for ci, co in ((4, 8), (8, 8), (8, 16), (16, 16), (16, 32)) for size in (16, 32)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} rounds "
          "(each the median of 15 calls)\n")
    print("| slots | batch | channels per slot | size | kernel | torch's input gradient ms | per phase ms "
          "| torch / per phase |\n|---:|---:|---|---:|---:|---:|---:|---:|")
    cl = torch.channels_last
    for s, b, ci, co, size, k in SHAPES:
        stride, pad = 2, k // 2
        x = torch.randn(b, s * ci, size, size, generator=g).contiguous(memory_format=cl)
        w = torch.randn(s * co, ci, k, k, generator=g).contiguous(memory_format=cl)
        out = (size + 2 * pad - k) // stride + 1
        go = torch.randn(b, s * co, out, out, generator=g).contiguous(memory_format=cl)
        forms = {
            "torch": lambda: torch.ops.aten.convolution_backward(
                go, x, w, None, [stride] * 2, [pad] * 2, [1, 1], False, [0, 0], s, [True, False, False])[0],
            "phases": lambda: input_gradient(go, w, x.shape, (stride, stride), (pad, pad), s),
        }
        want, got = forms["torch"](), forms["phases"]()
        torch.testing.assert_close(got, want, rtol=0, atol=8 * torch.finfo(want.dtype).eps * want.abs().max())
        runs: dict[str, list[float]] = {name: [] for name in forms}
        for _ in range(args.rounds):
            for name, fn in forms.items():
                runs[name].append(_median_ms(fn, 15))
        t, ph = statistics.median(runs["torch"]), statistics.median(runs["phases"])
        print(f"| {s} | {b} | {ci} -> {co} | {size} | {k}x{k} | {t:.2f} | {ph:.2f} | {t / ph:.2f}x |")


if __name__ == "__main__":
    main()
