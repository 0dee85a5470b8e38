"""Softmax and log-softmax over a short last dimension (10 classes, 8 tokens) on a CPU, 3-7x sooner.

Why: torch's CPU ``softmax`` and ``log_softmax`` over the last dimension
vectorize along that dimension. A row shorter than one vector register (16
fp32 values with AVX-512 kernels, 8 with AVX2 ones) falls to a scalar loop
per row. On a 2-core Xeon (AVX-512, one thread):

- ``log_softmax`` of ``[512, 10]`` fp32 took 66 us where ``[512, 16]`` took
  7 us: 6.6 ns per value against 0.9. A fused step of 8 digits MLPs (batch
  64, 10 classes) spent 8% of its time there.
- ``softmax`` of attention scores over 8 tokens, ``[8192, 8, 8]``, took 4.4 ms
  where ``[8192, 16, 16]`` took 1.1 ms (2 threads).

The kernels for any other dimension vectorize across the rows instead, with
each row's max, sum of exponentials and log in the scalar loop's order: the
same function of the transposed view takes 9-10 us for those 512 rows and
1.5 ms for those scores, forward and backward alike. It gives torch's values
to one rounding (a last bit apart now and then, where the vector and scalar
``exp``/``log`` round differently; ``tests/test_short_softmax.py``). With
``log_softmax`` each slot's rows get the same bits however many slots run with
it (its loops run within a slot's ``[C, B]``; 1,332 cases of 1-4,096 rows on
1 and 2 threads), so the hand-written MLP step's whole-stack, masked and
gathered steps still round alike. ``softmax``'s kernel blocks its loops over
all the rows, so a slot's bits may change with the number of slots; plans
with a softmax were never counted gather-exact (``fast_path.GATHER_EXACT_KINDS``).
Rows of a vector register or longer keep torch's last-dimension kernel,
which is then the faster (512 rows of 1,000 classes, one thread: 307 against 700 us).

Measured in a whole fused step (TransformerEncoder 2x(d64 h4 ff128), 32 slots,
batch 64, 2 threads, the attention's softmax here): 90.1 -> 84.6 ms at 8
tokens, 140.0 -> 121.4 ms at 12, 152.7 -> 151.5 at 16 (unchanged: no short rows).

The choice depends only on the tensor's shape, dtype and torch's CPU
capability, never on a timing: every process on a machine computes the same
bits, which is what lets a slot move between hosts and train on bit for bit.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["log_softmax", "short_rows", "softmax", "softmax_backward"]


@functools.cache
def _vector_bytes() -> int:
    """Bytes in one of torch's CPU vector registers: 64 with AVX-512 kernels, else 32 (AVX2 and the others)."""
    return 64 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 32


def short_rows(x: torch.Tensor) -> bool:
    """Whether ``x``'s last-dimension rows are shorter than a vector register on a CPU (the scalar loop)."""
    return (x.device.type == "cpu" and x.dim() >= 2 and x.dtype in (torch.float32, torch.float64)
            and x.size(-1) * x.element_size() < _vector_bytes())


def log_softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``torch.log_softmax(x, dim)``; for short last-dimension rows on a CPU through the kernel that
    vectorizes across rows (to a rounding of torch's values; the result is then a transposed view)."""
    if dim in (-1, x.dim() - 1) and short_rows(x):
        return torch.log_softmax(x.transpose(-1, -2), -2).transpose(-1, -2)
    return torch.log_softmax(x, dim)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``torch.softmax(x, dim)``, short last-dimension rows as :func:`log_softmax` takes them."""
    if dim in (-1, x.dim() - 1) and short_rows(x):
        return torch.softmax(x.transpose(-1, -2), -2).transpose(-1, -2)
    return torch.softmax(x, dim)


def softmax_backward(grad: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The gradient of :func:`softmax` over the last dimension by its input, from ``out`` = its result: what
    autograd computes for it (``torch._softmax_backward_data`` in the same layout), for a hand-written
    backward."""
    if short_rows(out):
        return torch._softmax_backward_data(grad.transpose(-1, -2), out.transpose(-1, -2), -2,
                                            out.dtype).transpose(-1, -2)
    return torch._softmax_backward_data(grad, out, -1, out.dtype)
