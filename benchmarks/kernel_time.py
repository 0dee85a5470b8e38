"""How long a training step's heavy kernels take on their own: the bound that the kernels set.

Why: a fused step of S models calls the same kinds of kernels as a loop of
the S models (GEMMs, convolutions, attention, recurrent layers, softmaxes), only batched
across the slots. Where those kernels are most of the loop's time, fusing
cannot save much: on a 2-core AMD EPYC, torch runs fp32 ``bmm`` and ``mm``
through MKL's AVX2 code at 90-160 GFLOP/s whether the GEMMs are batched or
not, so a transformer's fused step is bounded by its own GEMMs and attention
however little everything else costs. The dense roofline of
``fused_step.py`` cannot show this: it charges GEMMs at the large square
matmul's best rate (oneDNN's AVX-512), which these shapes never reach.

So this module measures the kernels themselves. :func:`record_heavy` runs a
step once under a ``TorchDispatchMode`` and keeps every heavy aten call
(:func:`is_heavy`) with the shapes, strides and dtypes of its tensors;
:func:`replay_time` then runs each call on its own, on fresh tensors of the
same layout (a fresh output too, where the call writes into one), and adds
the fastest of several runs of each, spread over three passes. That sum is
optimistic for the step: each kernel runs alone, warm, at the machine's best
moment, and none of the work between kernels is counted. Hence

    kernel bound = loop time of the S models / fused step's heavy-kernel time

is an upper bound on fused/loop for a fused step that calls these kernels at
these shapes: if it is below a target, the target is out of reach with the
kernels torch runs on this machine, whatever the fused step's other work costs.
The same replay of one model's loop step gives the part of the loop's own time
that its kernels take (``fused_step.py``'s column "kernels % of loop").

Timing under the dispatch mode itself is not used: the mode's bookkeeping
changes the step's allocations, and on this VM a tensor of ~100 MB that is
faulted in again costs more than its kernel (see ``benchmarks/RESULTS.md``,
session 11).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

# aten ops that do the step's matmul-like work, and the softmaxes, whose exponentials cost the same per element
# batched or not (a language model's loss over a 2,000-token vocabulary: 2.6 ms per model in the loop and per
# slot fused, see RESULTS.md, session 32); everything else (elementwise, reductions, copies, the optimizer's
# update, pooling, normalization) is what a fused step can save on.
HEAVY_NAMES = frozenset({
    "mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "mv", "addmv", "dot",
    "convolution", "convolution_backward", "_convolution", "mkldnn_convolution",
    "mkldnn_rnn_layer", "mkldnn_rnn_layer_backward", "_linear_pointwise",
    "_softmax", "_softmax_backward_data", "_log_softmax", "_log_softmax_backward_data",
    "strided_bmm",  # ray_modelbatch.strided_gemm: MKL's batched GEMM into a strided stack (a weight gradient)
})
HEAVY_PREFIXES = ("_scaled_dot_product_", "_flash_attention", "_efficient_attention", "_cudnn_rnn", "cudnn_convolution")


def is_heavy(op: Any) -> bool:
    """Whether aten ``op`` (an OpOverload) is a GEMM, convolution, attention, recurrent-layer or softmax kernel
    (in-place variants included: ``baddbmm_`` accumulates a weight gradient)."""
    name = op._schema.name.split("::")[-1].rstrip("_") or op._schema.name
    return name in HEAVY_NAMES or name.startswith(HEAVY_PREFIXES)


@dataclass(frozen=True)
class TensorSpec:
    """The layout of one tensor argument: enough to make a fresh tensor the kernel reads alike."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    device: torch.device

    def make(self) -> torch.Tensor:
        """A tensor of this layout, random values (integers: zeros), in storage of its own."""
        extent = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0) + 1
        if any(n == 0 for n in self.size):
            extent = self.offset + 1
        if self.dtype.is_floating_point or self.dtype.is_complex:
            base = torch.randn(extent, dtype=self.dtype, device=self.device)
        else:
            base = torch.zeros(extent, dtype=self.dtype, device=self.device)
        return base.as_strided(self.size, self.stride, self.offset)


def _spec(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        # Only the offset's alignment (64 bytes) matters to a kernel: slot s's view of a stacked buffer would
        # otherwise make a fresh tensor of the whole buffer up to it, per slot (at 128 slots, tens of GB).
        offset = v.storage_offset() % max(1, 64 // v.element_size())
        return TensorSpec(tuple(v.shape), tuple(v.stride()), offset, v.dtype, v.device)
    return v


def _make(v: Any) -> Any:
    return v.make() if isinstance(v, TensorSpec) else v


@dataclass(frozen=True)
class Call:
    """One heavy aten call of a recorded step."""

    op: Any
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.op._schema.name.split("::")[-1]


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if is_heavy(func):
            self.calls.append(Call(func, tree_map(_spec, args), tree_map(_spec, kwargs)))
        return func(*args, **kwargs)


def record_heavy(step: Callable[[], Any]) -> list[Call]:
    """Run ``step()`` once and return its heavy kernel calls, in order (backward included)."""
    with _Recorder() as rec:
        step()
    return rec.calls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def replay_time(calls: list[Call], reps: int = 5, passes: int = 3) -> dict[str, float]:
    """Seconds each kind of kernel takes when ``calls`` run one by one, summed by kernel name.

    Calls of the same op on the same layouts are timed once and counted as
    often as they occur. Each distinct call is timed in ``passes`` passes over
    all of them, ``reps`` runs each (after one warm-up run), and its fastest run
    counts: on a shared machine a slow phase lasts seconds, and spreading the
    runs of each call over the passes keeps one phase from inflating it.
    """
    distinct: dict[tuple, Call] = {}
    keys = []
    for call in calls:
        key = (call.op, repr(call.args), repr(sorted(call.kwargs.items(), key=lambda kv: kv[0])))
        distinct.setdefault(key, call)
        keys.append(key)
    best = dict.fromkeys(distinct, float("inf"))
    made = {k: (tree_map(_make, c.args), tree_map(_make, c.kwargs)) for k, c in distinct.items()}
    with torch.no_grad():
        for p in range(passes):
            for key, call in distinct.items():
                if best[key] == 0.0:
                    continue
                args, kwargs = made[key]
                device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)),
                              torch.device("cpu"))
                if p == 0:
                    try:  # warm-up: oneDNN builds its primitive, caches fill
                        call.op(*args, **kwargs)
                    except Exception as exc:  # noqa: BLE001 - e.g. a kernel that rejects random workspace bytes
                        # counted as free: the sum stays a lower bound, the kernel bound an upper one
                        print(f"kernel_time: {call.name} not replayed, counted as 0 s ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:100]})", file=sys.stderr)
                        best[key] = 0.0
                        continue
                for _ in range(reps):
                    _sync(device)
                    t0 = time.perf_counter()
                    call.op(*args, **kwargs)
                    _sync(device)
                    best[key] = min(best[key], time.perf_counter() - t0)
    total: dict[str, float] = {}
    for key in keys:
        name = distinct[key].name
        total[name] = total.get(name, 0.0) + best[key]
    return total


def heavy_seconds(step: Callable[[], Any], reps: int = 5, passes: int = 3) -> tuple[float, dict[str, float]]:
    """``(total, by kernel name)``: seconds of ``step``'s heavy kernels, each replayed on its own."""
    by_name = replay_time(record_heavy(step), reps, passes)
    return sum(by_name.values()), by_name
