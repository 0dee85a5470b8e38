"""A strided 1x1 convolution on a CPU as a 1x1 convolution of the strided input, forward and backward.

Why: a ResNet's downsampling shortcut is a 1x1 convolution of stride 2. A 1x1
kernel reads only every ``stride``-th position, so the layer is the same 1x1
convolution at stride 1 of those positions. oneDNN's grouped kernel for the
strided form computes its input gradient slowly: in the small ResNet of
``benchmarks/fused_step.py`` at 32 slots (``[64, 256, 16, 16]`` channels-last
in, 8 -> 16 channels per slot), 8.3 ms for the input gradient against 0.54 ms
for the same products at stride 1 (2 shared cores). Here the forward copies the
read positions into a dense tensor a quarter of the input's size and convolves
that at stride 1. The backward convolves at stride 1 too, and writes the input
gradient into a zeroed tensor at the read positions. The whole layer's forward
and backward took 5.7 against 11.7 ms at that shape.

It is the same products of the same values, so the output is bitwise torch's
at two threads, and on an AVX2 AMD EPYC the weight and bias gradients were
too (tested). At one thread (a slot host's on a 2-core node) oneDNN's strided
and unstrided kernels add in different orders: output and gradients up to 3e-7
of their largest value apart on an AVX-512 EPYC (session 49, tested). On
an AVX-512 Xeon oneDNN's strided and unstrided weight-gradient kernels add the
positions in different orders: the fp32 weight gradients differ by up to 5
ulps of their largest value (the bias gradient stays bitwise). So is the input
gradient at the ResNet's shape on the EPYC; at some others (2 channels per
group, 3-d input) oneDNN's strided kernel adds the output channels in another
order, and the two differ by fp32 rounding (1 ulp). A second derivative
(``create_graph=True``) differentiates torch's own strided convolution, so it
is exact torch, at torch's speed. The input is kept for the backward, as
torch's convolution keeps it (the layer before keeps it too, so no memory is
added); the strided copy is made again there.

Not taken (the caller keeps torch's convolution): kernels larger than 1,
padding, transposed convolutions, stride 1, other devices (cuDNN was not
measured), dtypes below fp32, autocast.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .torch_gradients import torch_gradients

__all__ = ["applies", "conv"]

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def applies(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Any, transposed: bool) -> bool:
    """Whether :func:`conv` computes ``F.convNd(x, weight, bias, stride, padding, dilation, groups)``."""
    spatial = x.dim() - 2
    pads = [padding] * spatial if isinstance(padding, int) else padding
    return (not transposed and x.dim() in _CONV and weight.dim() == x.dim()
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and not torch.is_autocast_enabled("cpu")
            and all(k == 1 for k in weight.shape[2:])
            and (pads == "valid" or (not isinstance(pads, str) and all(p == 0 for p in pads)))
            and len(stride) == spatial and any(s > 1 for s in stride))


def conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
         groups: int) -> torch.Tensor:
    """``F.convNd(x, weight, bias, stride, 0, 1, groups)`` for inputs :func:`applies` to; output in ``x``'s
    memory format (for 3-d input at one thread, in the format torch's unstrided kernel picks)."""
    return _StridedPointwiseConv.apply(x, weight, bias, tuple(stride), groups)


def _read_positions(x: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """The positions a 1x1 kernel of ``stride`` reads, as a dense tensor in ``x``'s memory format."""
    return x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))].contiguous(
        memory_format=_format(x))


def _format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


class _StridedPointwiseConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, ...], groups: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.stride, ctx.groups = stride, groups
        return _CONV[x.dim()](_read_positions(x, stride), weight, bias, 1, 0, 1, groups)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, bias = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: torch's own strided convolution, graph kept
            grads = torch_gradients(lambda x, w, b: _CONV[x.dim()](x, w, b, ctx.stride, 0, 1, ctx.groups),
                                    (x, weight, bias), need[:3], gy)
            return (*grads, None, None)
        spatial = x.dim() - 2
        dense = _read_positions(x, ctx.stride)
        gd, gw, gb = torch.ops.aten.convolution_backward(
            gy, dense, weight, None if bias is None else [bias.shape[0]], [1] * spatial, [0] * spatial,
            [1] * spatial, False, [0] * spatial, ctx.groups, [need[0], need[1], bias is not None and need[2]])
        gx = None
        if need[0]:  # zero where the kernel read nothing
            gx = torch.zeros_like(x, memory_format=_format(x))
            gx[(slice(None), slice(None), *(slice(None, None, s) for s in ctx.stride))] = gd
        return gx, gw, gb, None, None
