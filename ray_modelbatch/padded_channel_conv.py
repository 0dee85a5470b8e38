"""A grouped convolution with three input channels per group on a CPU: its weight gradient with a fourth, zero one.

Why: a CNN on RGB images, fused with one batch per slot (a sweep's slots each
draw their own batches), starts with a grouped convolution of 3 input
channels per group. oneDNN's grouped weight-gradient kernel is 3-5x slower for
3 channels per group than for 4 (2 shared cores, channels-last, 64 images of
32x32, 3x3 kernels, 16 output channels per slot: 72.9 ms at 16 slots against
26.5 ms with 4 input channels, 7.1-40 ms for every other count from 1 to 8).
At 32 slots of 3 -> 32 channels it took 491 ms, where the 32 models alone take
79 ms for theirs; it would have been most of a fused step.

So the backward computes the weight and bias gradients with every group's
input padded by a zero channel (and the weight by a zero input channel): the
products with the zero channel are exact zeros, its gradient is dropped, and
the other channels' gradients have the values each model's own convolution
gives (measured against fp64 on 8 slots: 9.0e-6 off, as each model alone; the
slow kernel, which sums in shorter pieces, was 3.9e-7 off). The padded copy of
the input is a third larger than the input, made once per backward: 75 against
264 ms at 32 slots of 3 -> 16 channels, 145 against 491 ms for 3 -> 32, 89
against 248 ms for a 7x7 stride-2 stem. The forward and the input's gradient
(not needed for images) keep oneDNN's own kernels, which are not slow here.

A second derivative (``create_graph=True``) differentiates torch's own
convolution, so it is exact torch, at torch's speed.

Not taken (the caller keeps torch's convolution): other channel counts, one
group (fast already), transposed convolutions, inputs that are not 4-d and
channels-last, other devices, dtypes below fp32, autocast, string padding.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .torch_gradients import torch_gradients

__all__ = ["applies", "conv"]


def applies(x: torch.Tensor, weight: torch.Tensor, groups: int, padding: Any, transposed: bool) -> bool:
    """Whether :func:`conv` computes ``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``."""
    return (not transposed and groups > 1 and weight.dim() == 4 and weight.shape[1] == 3 and x.dim() == 4
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and not torch.is_autocast_enabled("cpu") and not isinstance(padding, str)
            and x.is_contiguous(memory_format=torch.channels_last))


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
         padding: Sequence[int], dilation: Sequence[int], groups: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` for inputs :func:`applies` to."""
    return _PaddedChannelConv.apply(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def _with_zero_channel(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``x`` (``[N, groups*3, H, W]``, channels-last) with a zero fourth channel in every group, channels-last."""
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n, h, w, groups, c // groups)  # a view of the channels-last memory
    return F.pad(rows, (0, 1)).reshape(n, h, w, groups * (c // groups + 1)).permute(0, 3, 1, 2)


class _PaddedChannelConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...],
                groups: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.conv = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, bias = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: torch's own convolution, graph kept
            grads = torch_gradients(lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation, groups),
                                    (x, weight, bias), need[:3], gy)
            return (*grads, None, None, None, None)
        gx = gw = gb = None
        args = (list(stride), list(padding), list(dilation), False, [0, 0], groups)
        if need[0]:
            gx = torch.ops.aten.convolution_backward(gy, x, weight, None, *args, [True, False, False])[0]
        if need[1] or (bias is not None and need[2]):
            wide = F.pad(weight, (0, 0, 0, 0, 0, 1)).contiguous(memory_format=torch.channels_last)
            _, gw, gb = torch.ops.aten.convolution_backward(
                gy, _with_zero_channel(x, groups), wide, None if bias is None else [bias.shape[0]], *args,
                [False, need[1], bias is not None and need[2]])
            gw = None if gw is None else gw[:, :3]
        return gx, gw, gb, None, None, None, None
