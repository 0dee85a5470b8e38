"""Training-mode BatchNorm of a channels-last CPU tensor, with each channel's sums taken in short pieces.

Why: a fused CNN keeps its activations channels-last (``[B, S*C, H, W]`` with
the channels innermost, see :mod:`.fast_path`), where torch's CPU BatchNorm
adds each channel's values in one long fp32 sum and loses the accuracy each
model alone has (:func:`batch_norm` gives the figures). The same kernels here
sum in pieces, as torch's NCHW kernels do.

Not taken (the caller keeps ``F.batch_norm``): evaluation with running
statistics, input that is not 4-d and channels-last in memory, other devices
or dtypes, and layers whose channels :func:`pieces` leaves whole (at most
:data:`PIECE` values each, which torch's kernel sums as accurately, or a count
with no divisor up to :data:`MAX_PIECES`); see :func:`applies`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["applies", "batch_norm", "pieces", "PIECE", "MAX_PIECES"]

PIECE = 256  # values per piece of a channel's sums (torch's NCHW kernels: similar)
MAX_PIECES = 64


def applies(h: torch.Tensor, use_batch: bool) -> int:
    """How many pieces :func:`batch_norm` sums each channel of ``h`` in, or 0 where the caller keeps
    ``F.batch_norm``: statistics of the batch of a 4-d fp32 channels-last CPU tensor of more than one
    channel, whose channels :func:`pieces` splits in more than one piece."""
    if not (use_batch and h.device.type == "cpu" and h.dtype == torch.float32 and h.dim() == 4
            and h.size(1) > 1 and h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()):
        return 0
    k = pieces(h.numel() // h.size(1))
    return k if k > 1 else 0


def pieces(count: int) -> int:
    """How many pieces to sum ``count`` values per channel in: the fewest (a divisor of ``count``, at most
    :data:`MAX_PIECES`) that leave at most :data:`PIECE` values in each, else the most up to
    :data:`MAX_PIECES` (16384 values: 64 pieces of 256; 4096: 16 of 256; 256 or fewer: 1)."""
    divisors = [k for k in range(1, min(MAX_PIECES, count) + 1) if count % k == 0]
    return next((k for k in divisors if count // k <= PIECE), divisors[-1])


def batch_norm(h: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, rm: torch.Tensor | None,
               rv: torch.Tensor | None, momentum: float, eps: float, k: int) -> torch.Tensor:
    """Training-mode BatchNorm of a channels-last ``[B, C, H, W]`` CPU tensor, its sums taken in ``k`` pieces
    per channel (:func:`pieces`).

    Torch's CPU kernels for channels-last input add each channel's ``B*H*W``
    values up in one running fp32 sum per channel, where its NCHW kernels sum in
    short pieces. Measured against fp64 (64x16x16 values per channel): batch
    mean 1.7e-6 off against 6e-8, weight and bias gradients 2.3e-5 and 2.9e-6 off
    against 1.1e-6 and 6e-8. A BatchNorm's backward subtracts nearly equal terms,
    so through a network these errors grew: a small ResNet's fused gradients were
    up to 5% off in some slots, where each model alone is 2e-6 off.

    Here the same kernels sum in pieces: the ``[B*H*W, C]`` channels-last memory
    viewed as ``[B*H*W/k, k*C]`` makes each of ``k`` pieces of a channel a
    channel of its own (no copy), and the pieces' sums are then added:
    ``torch.batch_norm_update_stats`` gives the statistics (mean 3e-8 off), one
    ``addcmul`` normalizes with them (as torch's kernel does), and in the backward
    ``native_batch_norm_backward`` gives the two per-channel sums (``sum(go)``,
    ``sum(go * xhat)``), from which two elementwise ops make the input's gradient.
    That costs some speed: whole steps at 32 slots took 200 against 190 ms (small
    ResNet), 122 against 116 ms (LeNet + BatchNorm) and 15.3 against 14.3 ms (the
    sweep's 8x8 CNN), measured in-process, alternating. With one piece (256 values
    or fewer per channel) torch's own kernel is as accurate and runs instead.
    """
    c = h.size(1)
    count = h.numel() // c
    flat = h.permute(0, 2, 3, 1).reshape(count // k, k * c)  # a view of the channels-last memory
    with torch.no_grad():
        pieces_mean, pieces_var = torch.batch_norm_update_stats(flat, None, None, 0.0)
        pieces_mean = pieces_mean.view(k, c)
        mean = pieces_mean.mean(0)
        # every piece has count/k values: the variance is the pieces' mean variance plus their means' spread
        var = pieces_var.view(k, c).mean(0).add_((pieces_mean - mean).square_().mean(0))
        if rm is not None:  # as torch's training-mode update: the running variance is the unbiased one
            rm.lerp_(mean, momentum)
        if rv is not None:
            rv.lerp_(var * (count / max(count - 1, 1)), momentum)
    return _BatchNormGivenStats.apply(h, w, b, mean, var, eps, k)


class _BatchNormGivenStats(torch.autograd.Function):
    """Training-mode BatchNorm of a channels-last ``[B, C, H, W]`` tensor (gradients through the batch
    statistics included), with the statistics given and the backward's sums taken in pieces."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, mean: torch.Tensor,
                var: torch.Tensor, eps: float, k: int) -> torch.Tensor:
        ctx.save_for_backward(h, w, b, mean, var)
        ctx.eps, ctx.pieces = eps, k
        # h * scale + shift, as torch's kernel normalizes (its eval mode, given statistics, was 2x slower on
        # channels-last input); out= keeps the channels-last layout, which a broadcast first operand would not
        scale = (var + eps).rsqrt()
        if w is not None:
            scale = scale * w
        shift = -mean * scale if b is None else b - mean * scale
        view = (1, -1, 1, 1)
        return torch.addcmul(shift.view(view), h, scale.view(view), out=torch.empty_like(h))

    @staticmethod
    def backward(ctx: Any, go: torch.Tensor) -> tuple[Any, ...]:
        h, w, b, mean, var = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # a graph of the gradient (double backward): the same math, differentiable
            with torch.enable_grad():
                out = F.batch_norm(h, None, None, w, b, True, 0.0, ctx.eps)
                wanted = [t for t, n in zip((h, w, b), need) if n]
                grads = iter(torch.autograd.grad(out, wanted, go, create_graph=True))
                return (*(next(grads) if n else None for n in need[:3]), None, None, None, None)
        c, k = h.size(1), ctx.pieces
        count = h.numel() // c
        go = go.contiguous(memory_format=torch.channels_last)
        invstd = (var + ctx.eps).rsqrt()
        # per piece: sum(go * (h - mean) * invstd) and sum(go), as "weight" and "bias" gradients
        _, dots, sums = torch.ops.aten.native_batch_norm_backward(
            go.permute(0, 2, 3, 1).reshape(count // k, k * c), h.permute(0, 2, 3, 1).reshape(count // k, k * c),
            None, None, None, mean.repeat(k), invstd.repeat(k), True, ctx.eps, [False, True, True])
        dot, sum_go = dots.view(k, c).sum(0), sums.view(k, c).sum(0)
        gh = None
        if need[0]:  # w / std * (go - mean(go) - xhat * mean(go * xhat)), as torch's kernel computes it
            scale = invstd if w is None else invstd * w
            slope = -scale * invstd * dot / count  # of (h - mean)
            shift = -scale * sum_go / count - slope * mean
            view = (1, c, 1, 1)
            gh = torch.addcmul(shift.view(view), h, slope.view(view), out=torch.empty_like(h))
            gh.addcmul_(go, scale.view(view))
        gw = dot if w is not None and need[1] else None
        gb = sum_go if b is not None and need[2] else None
        return gh, gw, gb, None, None, None, None
