"""The forms a fused Linear layer's GEMMs can take on a CPU, on the families' shapes.

Why: the fused step of a Linear layer is three batched GEMMs over the slots
(forward, input gradient, weight gradient), which torch runs as ``bmm``. On an
AMD CPU that is MKL's AVX2 code (``torch.mm`` reaches about half of oneDNN's
AVX-512 rate on a large square matmul), and torch sends fp32 matmuls to oneDNN
only in its reduced-precision modes, which would change every slot's numbers.
This script measures the forms that do reach oneDNN in fp32 against ``bmm``,
so that a choice of form rests on figures from the machine at hand:

* ``bmm``: forward, input gradient and weight gradient, GFLOP/s each;
* a grouped 1x1 convolution over channels-last activations (one group per
  slot, the rows as the width): its forward GFLOP/s, and its forward plus
  backward in ms against the three ``bmm`` together;
* the shared-input first layer as one oneDNN GEMM over every slot's weights
  (which live slot-strided in the optimizer's flat buffer, so they are copied
  first), against the ``baddbmm`` the fused path runs, and its weight gradient
  into a contiguous block copied into the slot-strided buffer against ``bmm``
  into that buffer.

With ``--inductor``, also each ``bmm`` as Inductor's own C++ GEMM template
compiles it (``torch.compile`` with ``max_autotune`` and only the ``CPP``
backend, so the template is what runs, not ATen's ``bmm`` that autotuning
would otherwise keep): the one kernel generator torch has besides MKL and
oneDNN. Its compile time per shape is printed too.

Medians of ``--reps`` timings per form, over ``--rounds`` rounds (the machine
is shared). Runs without Ray::

    python benchmarks/gemm_forms.py [--slots 32] [--rounds 3] [--reps 15] [--inductor]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ray_modelbatch.cpu_memory import keep_freed_memory
from ray_modelbatch.fast_path import _onednn_linear, _shared_input_weight_grad

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conv_forms import _median_ms  # noqa: E402 - a sibling benchmark's timing

# (rows, in, out) per slot: the 784 MLP's layers (batch 64) and the transformer's projections (64 x 16 tokens)
SHAPES = [(64, 784, 256), (64, 256, 256), (1024, 64, 192), (1024, 128, 64)]


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls (conv_forms' timing, in seconds)."""
    return _median_ms(fn, reps) / 1e3


def per_slot_forms(s: int, rows: int, d_in: int, d_out: int, reps: int) -> dict[str, float]:
    x, w, g = torch.randn(s, rows, d_in), torch.randn(s, d_out, d_in), torch.randn(s, rows, d_out)
    flops = 2 * s * rows * d_in * d_out / 1e9
    fwd = timed(lambda: torch.bmm(x, w.transpose(1, 2)), reps)
    dx = timed(lambda: torch.bmm(g, w), reps)
    dw = timed(lambda: torch.bmm(g.transpose(1, 2), x), reps)
    # channels-last [1, S*in, 1, rows] is the memory [rows, S, in]; weight [S*out, in, 1, 1], one group per slot
    xc = x.transpose(0, 1).contiguous().view(1, 1, rows, s * d_in).permute(0, 3, 1, 2)
    wc = w.reshape(s * d_out, d_in, 1, 1)
    conv = timed(lambda: F.conv2d(xc, wc, groups=s), reps)
    xr, wr = xc.detach().requires_grad_(), wc.detach().requires_grad_()
    gc = torch.randn_like(F.conv2d(xr, wr, groups=s))
    conv_all = timed(lambda: torch.autograd.grad(F.conv2d(xr, wr, groups=s), (xr, wr), gc), reps)
    return {"bmm_fwd": flops / fwd, "bmm_dx": flops / dx, "bmm_dw": flops / dw, "bmm_ms": 1e3 * (fwd + dx + dw),
            "conv_fwd": flops / conv, "conv_ms": 1e3 * conv_all}


def inductor_forms(s: int, rows: int, d_in: int, d_out: int, reps: int) -> dict[str, float]:
    """The three ``bmm`` of :func:`per_slot_forms` compiled to Inductor's C++ GEMM template: GFLOP/s each, and
    the seconds compiling took. The template takes no transposed first operand (torch 2.13), so the weight
    gradient's is made contiguous first, outside the timing: a bound in its favour."""
    import time

    import torch._inductor.config as inductor

    x, w, g = torch.randn(s, rows, d_in), torch.randn(s, d_out, d_in), torch.randn(s, rows, d_out)
    flops = 2 * s * rows * d_in * d_out / 1e9
    out: dict[str, float] = {"compile_s": 0.0}
    with inductor.patch(max_autotune=True, max_autotune_gemm_backends="CPP"):
        for name, a, b in (("fwd", x, w.transpose(1, 2)), ("dx", g, w), ("dw", g.transpose(1, 2).contiguous(), x)):
            torch._dynamo.reset()  # a fresh compile per form: one shape each
            fn = torch.compile(torch.bmm, dynamic=False)
            start = time.perf_counter()
            fn(a, b)
            out["compile_s"] += time.perf_counter() - start
            out[name] = flops / timed(lambda fn=fn, a=a, b=b: fn(a, b), reps)
    return out


def shared_first_layer(s: int, rows: int, d_in: int, d_out: int, reps: int) -> dict[str, float]:
    numel = d_out * d_in + d_out + 1000  # a slot's flat row: this layer and more parameters after it
    flat, grads = torch.randn(s, numel), torch.zeros(s, numel)
    w = flat[:, : d_out * d_in].view(s, d_out, d_in)
    b = flat[:, d_out * d_in: d_out * d_in + d_out]
    gw = grads[:, : d_out * d_in].view(s, d_out, d_in)
    x, g = torch.randn(rows, d_in), torch.randn(s, rows, d_out)
    xs = x.unsqueeze(0).expand(s, rows, d_in)
    fwd = timed(lambda: torch.baddbmm(b.unsqueeze(1), xs, w.transpose(1, 2)), reps)
    fwd_dnn = timed(lambda: _onednn_linear(x, w.reshape(s * d_out, d_in), b.reshape(-1)), reps)
    dw = timed(lambda: torch.bmm(g.transpose(1, 2), xs, out=gw), reps)

    def dw_dnn() -> None:  # as ModelBatch(cpu_gemm="onednn") does it: one GEMM, then into the strided buffer
        gw.copy_(_shared_input_weight_grad(g, x))

    return {"fwd_ms": 1e3 * fwd, "fwd_dnn_ms": 1e3 * fwd_dnn, "dw_ms": 1e3 * dw, "dw_dnn_ms": 1e3 * timed(dw_dnn, reps)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--inductor", action="store_true", help="also Inductor's C++ GEMM template (compiles per shape)")
    args = p.parse_args()
    keep_freed_memory()  # as a fused step runs: freed blocks are reused, not faulted in again
    s = args.slots
    rounds = [[per_slot_forms(s, *shape, args.reps) for shape in SHAPES] for _ in range(args.rounds)]
    first = [shared_first_layer(s, *SHAPES[0], args.reps) for _ in range(args.rounds)]

    def med(values: list[float]) -> float:
        return statistics.median(values)

    print(f"S={s} slots, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}; "
          f"median of {args.rounds} rounds, each the median of {args.reps} timings\n")
    print("| per slot (rows x in -> out) | bmm forward GFLOP/s | bmm input grad | bmm weight grad | grouped 1x1 conv "
          "forward (channels-last) | conv forward + backward ms | three bmm ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for i, (rows, d_in, d_out) in enumerate(SHAPES):
        r = {k: med([rnd[i][k] for rnd in rounds]) for k in rounds[0][i]}
        print(f"| {rows} x {d_in} -> {d_out} | {r['bmm_fwd']:.0f} | {r['bmm_dx']:.0f} | {r['bmm_dw']:.0f} | "
              f"{r['conv_fwd']:.0f} | {r['conv_ms']:.2f} | {r['bmm_ms']:.2f} |")
    if args.inductor:
        print("\n| per slot (rows x in -> out) | Inductor C++ template forward GFLOP/s | input grad | weight grad | "
              "compiling s |")
        print("|---|---:|---:|---:|---:|")
        for shape in SHAPES:
            r = [inductor_forms(s, *shape, args.reps) for _ in range(args.rounds)]
            m = {k: med([x[k] for x in r]) for k in r[0]}
            print(f"| {shape[0]} x {shape[1]} -> {shape[2]} | {m['fwd']:.0f} | {m['dx']:.0f} | {m['dw']:.0f} | "
                  f"{m['compile_s']:.1f} |")
    f = {k: med([r[k] for r in first]) for k in first[0]}
    rows, d_in, d_out = SHAPES[0]
    print(f"\nShared-input first layer ({rows} x {d_in} -> {d_out} per slot): forward `baddbmm` {f['fwd_ms']:.2f} ms, "
          f"one oneDNN GEMM over all slots' copied weights {f['fwd_dnn_ms']:.2f} ms; weight gradient `bmm` into the "
          f"slot-strided buffer {f['dw_ms']:.2f} ms, oneDNN into a block then copied {f['dw_dnn_ms']:.2f} ms")


if __name__ == "__main__":
    main()
