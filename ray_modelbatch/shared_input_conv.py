"""A convolution of one batch shared by every slot, with few input channels, on a CPU: its weight gradient as
one batched GEMM over the im2col rows.

Why: when every slot trains on the same batch, a fused CNN's first layer is one
ungrouped convolution of that batch into all slots' channels side by side
(``[S*O, C, k, k]``). With one input channel, oneDNN's weight gradient for it
reads the output gradient at a few GB/s: for the 28x28 CNN of
``benchmarks/fused_step.py`` at 32 slots (64 images, 1 -> 16 channels per slot,
3x3) it took 25 ms in the step where one read of that gradient (103 MB) takes
about 6 ms. Here the input's im2col rows (``C*k*k`` values per output
position, a few MB) and a column of ones meet the output gradient in one
batched GEMM, in pieces of about 4,096 positions whose products are summed at
the end: the weight and bias gradients in one pass over the output gradient.

The sums are the same products in another order (pieces of 4,096 positions,
then the pieces), and the shorter sums round less: against fp64 at the 28x28
CNN's shape (32 slots), 2.7e-7 off where oneDNN's one running sum per weight
is 6.1e-6 off (tested: never further than torch's). In that CNN's whole fused
step, alternating in one process: 178.6 against 192.8 ms; the GroupNorm CNN's
242.6 against 256.7 ms; LeNet's (5x5, 192 output channels) unchanged. The
forward stays oneDNN's (faster than a GEMM here); the input needs no gradient.

A small output is another matter: oneDNN's gradient is then fast, and this
form's im2col and GEMMs cost more than they save. On an AVX-512 Xeon (one
thread, forward and backward, torch against this form), 16 images of 32x32,
1 -> O channels 5x5: O = 6 0.44 against 1.51 ms, 48 1.85 against 2.62, 192
4.4 against 9.2; 64 images of 28x28, 3x3: O = 16 1.31 against 2.36, 96 6.9
against 6.3, 192 35 against 16, 512 164 against 105; 32 images of 32x32, 3
channels: O = 16 1.09 against 3.40, 192 15.9 against 12.6, 512 84 against 58.
So it is taken from :data:`MIN_OUTPUT` output elements on (a one-trial stack
of Tune's CIFAR tutorial CNN, 16 x 6 x 28 x 28, stays with torch).

Not taken (the caller keeps torch's convolution): an input that needs a
gradient (not a batch of data), more than :data:`MAX_ROW` values per im2col
row, grouped convolutions (each slot on its own batch: oneDNN's grouped kernel
is fast there, 29.8 ms, and this form slower, 46.0), transposed ones, inputs
that are not 4-d and channels-last, other devices, dtypes below fp32, autocast,
string padding.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .torch_gradients import torch_gradients

__all__ = ["MAX_ROW", "applies", "conv"]

MAX_ROW = 32  # C*k*k: one channel up to 5x5, three channels at 3x3 (measured where oneDNN is slow: see above)
MIN_OUTPUT = 5_000_000  # output elements below which oneDNN's own weight gradient is faster (see above)
_PIECE = 4096  # output positions per piece of the weight gradient's GEMM


def applies(x: torch.Tensor, weight: torch.Tensor, groups: int, padding: Any, transposed: bool,
            stride: Sequence[int] = (1, 1)) -> bool:
    """Whether :func:`conv` computes ``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``."""
    if x.dim() != 4 or weight.dim() != 4:
        return False
    # output elements (with the input's size, as a 'same' padding gives): the gradient oneDNN reads slowly
    out = x.shape[0] * weight.shape[0] * (x.shape[2] // stride[0]) * (x.shape[3] // stride[-1])
    return (not transposed and groups == 1 and out >= MIN_OUTPUT
            and weight[0].numel() <= MAX_ROW and not x.requires_grad
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and not torch.is_autocast_enabled("cpu") and not isinstance(padding, str)
            and x.is_contiguous(memory_format=torch.channels_last))


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
         padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation)`` for inputs :func:`applies` to."""
    return _SharedInputConv.apply(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation))


class _SharedInputConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...]) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.conv = (stride, padding, dilation)
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, bias = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: torch's own convolution, graph kept
            grads = torch_gradients(lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation),
                                    (x, weight, bias), need[:3], gy)
            return (*grads, None, None, None)
        with_bias = bias is not None and need[2]
        # im2col rows [positions, C*k*k] (+ a column of ones for the bias), and the output gradient as
        # [positions, S*O]: channels-last, so a view
        rows = F.unfold(x, weight.shape[2:], dilation, padding, stride).transpose(1, 2).reshape(-1, weight[0].numel())
        if with_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
        go = gy.permute(0, 2, 3, 1).reshape(-1, gy.shape[1])
        pieces = _pieces(rows.shape[0])
        sums = torch.bmm(rows.view(pieces, -1, rows.shape[1]).transpose(1, 2),
                         go.view(pieces, -1, go.shape[1])).sum(0)  # [C*k*k (+1), S*O]
        gw = sums[:weight[0].numel()].t().reshape(weight.shape) if need[1] else None
        gb = sums[-1] if with_bias else None
        return None, gw, gb, None, None, None


def _pieces(positions: int) -> int:
    """How many equal pieces of about :data:`_PIECE` positions split ``positions``."""
    k = max(1, positions // _PIECE)
    while positions % k:
        k -= 1
    return k
