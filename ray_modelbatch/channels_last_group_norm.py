"""GroupNorm of a channels-last CPU tensor from per-sample channel statistics, forward and backward.

Why: a fused CNN keeps its activations channels-last (``[B, S*C, H, W]`` with
the channels innermost, see :mod:`.fast_path`), and torch's CPU
``F.group_norm`` on such input is far slower than on the same values in NCHW.
For the GroupNorm CNN of ``benchmarks/fused_step.py`` at 32 slots (``[64, 512,
28, 28]`` in 128 groups, then ``[64, 1024, 14, 14]`` in 256), the two layers'
forward and backward took 126 and 52 ms there (2 shared cores, freed memory
kept, see :mod:`.cpu_memory`), about 45% of the whole fused step.

Each sample's groups are its own, so everything here is per sample, and
torch's BatchNorm kernels, which are fast on channels-last input, do the
passes over the data: ``torch.batch_norm_update_stats`` on one sample gives
that sample's mean and variance of every channel in one pass (Welford, as
BatchNorm keeps them), and ``native_batch_norm_backward`` with only the
weight and bias gradients asked for gives ``sum(dy)`` and ``sum(dy * (x - mu))``
per channel in one pass. A group's statistics combine its channels' (the
variance as the mean of the channels' variances plus the variance of their
means: no cancellation of large squares). The output is one ``addcmul`` of
``x`` with a per-sample, per-channel scale and shift; the input gradient two,
``dx = A*dy + B*x + D`` with ``A``, ``B``, ``D`` per sample and channel or group.
Measured at the shapes above: 67 and 33-47 ms against torch's 119-130 and 49-54.
(torch's NCHW kernel takes 41 and 16 ms, but copying to NCHW and back costs 43
ms each way.) An instance norm is the case of one channel per group: 49 against
136 ms at ``[64, 512, 28, 28]``, where torch also returns NCHW output.

It rounds differently from torch's kernel, by fp32 rounding (about 1e-7 of
the output's scale), and is the more accurate of the two where the mean is
large against the spread: torch's channels-last kernel takes the variance from
large squares (off by 0.06 with a mean 1,000 times the spread, this one by
9e-5, fp32's step there being 6e-5). It also avoids a crash: torch 2.13's
channels-last backward segfaults when the weight needs a gradient and the
input does not. A second derivative (``create_graph=True``: a gradient
penalty) differentiates torch's own ``F.group_norm`` instead, so it is exact
torch, at torch's speed.

Not taken (the caller keeps ``F.group_norm``): input that is not 4-d and
channels-last in memory, other devices, dtypes below fp32 or autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .torch_gradients import torch_gradients

__all__ = ["applies", "group_norm"]


def applies(x: torch.Tensor, num_groups: int) -> bool:
    """Whether :func:`group_norm` computes ``F.group_norm(x, num_groups, ...)`` (see the module docstring)."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and x.shape[0] > 0 and x.shape[1] % num_groups == 0
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            and not torch.is_autocast_enabled("cpu"))


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)`` for inputs :func:`applies` to; channels-last output."""
    return _GroupNorm.apply(x, num_groups, weight, bias, eps)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` channels-last as the ``[N, H*W, C]`` matrix it is in memory (a view)."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


def _from_rows(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    n, c, h, w = shape
    return t.view(n, h, w, c).permute(0, 3, 1, 2)


def _per_group(t: torch.Tensor, groups: int) -> torch.Tensor:
    """``[N, C]`` per channel as ``[N, G, C/G]``: each group's channels on the last dimension."""
    return t.view(t.shape[0], groups, -1)


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):  # noqa: ANN001, ANN205 - autograd's signature
        per = x.shape[1] // num_groups
        stats = [torch.batch_norm_update_stats(x[i:i + 1], None, None, 0.0) for i in range(x.shape[0])]
        mean_c = _per_group(torch.stack([m for m, _ in stats]), num_groups)  # [N, G, C/G]
        var_c = _per_group(torch.stack([v for _, v in stats]), num_groups)  # biased, per channel
        mean = mean_c.mean(-1)
        var = var_c.mean(-1) + (mean_c - mean.unsqueeze(-1)).square().mean(-1)
        rstd = (var + eps).rsqrt()  # [N, G]
        scale = rstd.repeat_interleave(per, 1)
        if weight is not None:
            scale = scale * weight
        shift = -mean.repeat_interleave(per, 1) * scale
        if bias is not None:
            shift = shift + bias
        out = torch.addcmul(shift.unsqueeze(1), _rows(x), scale.unsqueeze(1))
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.eps = num_groups, eps
        return _from_rows(out, x.shape)

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        x, weight, bias, mean, rstd = ctx.saved_tensors
        groups = ctx.num_groups
        if torch.is_grad_enabled():  # create_graph=True: differentiate torch's own op, twice if asked
            return _torch_grads(ctx, x, weight, bias, gy)
        n, c, h, w = x.shape
        per, count = c // groups, h * w * (c // groups)
        gy = gy.contiguous(memory_format=torch.channels_last)
        mean_c, rstd_c = mean.repeat_interleave(per, 1), rstd.repeat_interleave(per, 1)  # [N, C]
        ones = torch.ones(c, dtype=x.dtype)
        # Per sample and channel: sum(dy) and sum(dy * (x - group mean)), one pass each sample.
        sums = [torch.ops.aten.native_batch_norm_backward(gy[i:i + 1], x[i:i + 1], ones, None, None, mean_c[i],
                                                          ones, True, 0.0, [False, True, True])
                for i in range(n)]
        centred = torch.stack([s[1] for s in sums])  # [N, C]
        sdy = torch.stack([s[2] for s in sums])
        wc = ones if weight is None else weight
        g1 = _per_group(wc * sdy, groups).sum(-1) / count  # mean over the group of w*dy
        g2 = _per_group(wc * centred, groups).sum(-1) * rstd / count  # ... of w*dy*xhat
        a = rstd_c * wc
        b = -(rstd * rstd * g2)  # [N, G]
        d = -rstd * g1 - b * mean
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.addcmul(d.repeat_interleave(per, 1).unsqueeze(1), _rows(gy), a.unsqueeze(1))
            dx.addcmul_(_rows(x), b.repeat_interleave(per, 1).unsqueeze(1))
            dx = _from_rows(dx, x.shape)
        dw = (centred * rstd_c).sum(0) if weight is not None and ctx.needs_input_grad[2] else None
        db = sdy.sum(0) if bias is not None and ctx.needs_input_grad[3] else None
        return dx, None, dw, db, None


def _torch_grads(ctx, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                 gy: torch.Tensor) -> tuple:
    """The gradients as torch's ``F.group_norm`` gives them, with a graph of their own (double backward).

    On an NCHW copy of ``x``: torch's channels-last kernel is the inaccurate one (module docstring).
    """
    need = ctx.needs_input_grad
    gx, gw, gb = torch_gradients(lambda x, w, b: F.group_norm(x.contiguous(), ctx.num_groups, w, b, ctx.eps),
                                 (x, weight, bias), (need[0], need[2], need[3]), gy)
    return gx, None, gw, gb, None
