"""Attention over short sequences on a CPU as three batched GEMMs and a softmax, forward and backward.

Why: torch's CPU ``F.scaled_dot_product_attention`` (its flash kernel) works
one (sequence, head) block at a time, with a fixed cost per block that
dwarfs the arithmetic when sequences are short. The direct path folds every
slot's sequences into one call (see :mod:`.direct_attention`), so a stack of
32 small transformers makes 8,192 blocks of 16 tokens per layer, each a few
microseconds of bookkeeping around 16 x 16 x 16 products. Written as
``bmm``-softmax-``bmm`` with contiguous operands, those products are batched
GEMMs that MKL runs back to back. Measured on 2 shared cores (4 heads of 16,
forward and backward, the model of ``benchmarks/fused_step.py --models
transformer``): 14.7 against 30.3 ms at 16 tokens (2,048 sequences), 19.9
against 24.6 ms at 32 (1,024); at 64 tokens the two are level (32 ms, the
scores no longer fit the cache), so :data:`MAX_LEN` is 32.

The math is SDPA's: ``softmax(q k^T * scale + mask) v``, with a boolean mask
meaning "may attend" and a row that may attend to nothing giving zeros (as
torch's CPU kernel returns). It rounds differently from the flash kernel's
blocked online softmax, by fp32 rounding (about 1e-6), never more. It is
plain differentiable ops, so autograd's backward (as fast as a written-out
one here: 16.4 against 16.0 ms) also differentiates twice, which torch's CPU
flash kernel does not.

It keeps more for the backward than the flash kernel does: the attention
probabilities and the contiguous copies of q, k and v, ``M*(Tq*Tk + Tq*D +
2*Tk*D)`` floats for ``M`` sequence-heads (at 32 tokens, 4 heads of 16, 64
sequences per slot and 32 slots: 84 MB per layer); a host's ``"auto"``
capacity profile measures it like any other memory.

Not taken (the caller keeps SDPA): dropout (SDPA draws its own mask),
sequences longer than :data:`MAX_LEN`, other devices, dtypes below fp32 or
autocast, a mask that needs a gradient or has more dimensions than q,
grouped-query attention, batch dimensions that differ between q, k and v.
"""

from __future__ import annotations

import math

import torch

from . import short_softmax

__all__ = ["MAX_LEN", "applies", "attention", "packed_self_attention"]

MAX_LEN = 32


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float,
            enable_gqa: bool = False) -> bool:
    """Whether :func:`attention` computes this SDPA call (see the module docstring for what it leaves out)."""
    return (dropout_p == 0.0 and not enable_gqa and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.float64) and k.dtype == v.dtype == q.dtype
            and not torch.is_autocast_enabled("cpu")
            and q.dim() >= 3 and q.dim() == k.dim() == v.dim()
            and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and k.shape[-2] == v.shape[-2]
            and q.shape[-1] == k.shape[-1]
            and q.shape[-2] <= MAX_LEN and k.shape[-2] <= MAX_LEN
            and (mask is None or (not mask.requires_grad and mask.dim() <= q.dim()
                                  and (mask.dtype == torch.bool or mask.dtype == q.dtype))))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal, scale)`` for calls :func:`applies` to."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    lead, tq, tk = q.shape[:-2], q.shape[-2], k.shape[-2]
    # One copy each into [batch, tokens, features]: every bmm below, and each of autograd's, then reads
    # contiguous matrices or their transposes (the strided views gave a 3-4x slower backward, measured).
    qm, km, vm = q.reshape(-1, tq, q.shape[-1]), k.reshape(-1, tk, k.shape[-1]), v.reshape(-1, tk, v.shape[-1])
    p = _probabilities(torch.bmm(qm, km.transpose(1, 2)) * scale, lead, mask, is_causal)
    return torch.bmm(p, vm).view(*lead, tq, v.shape[-1])


def _probabilities(s: torch.Tensor, lead: torch.Size, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """The attention probabilities from the scaled scores ``s`` (``[M, Tq, Tk]``, ``M = prod(lead)``), masked
    as SDPA masks them. Writes into ``s``, which no backward reads (a scaling's or a GEMM's output)."""
    if mask is None and not is_causal:
        return short_softmax.softmax(s)  # (8 tokens: 3x sooner than torch.softmax, see there)
    tq, tk = s.shape[-2:]
    view = s.view(*lead, tq, tk)
    if mask is not None:
        view.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else view.add_(mask)
    if is_causal:  # SDPA's: query i attends to keys 0..i
        s.masked_fill_(torch.ones(tq, tk, dtype=torch.bool, device=s.device).triu_(1), float("-inf"))
    # A query that may attend to nothing: softmax would give NaN (and NaN gradients), SDPA gives zeros.
    # Its scores become 0 before the softmax and its probabilities 0 after, so both directions stay finite.
    nothing = s.amax(-1, keepdim=True) == float("-inf")
    return short_softmax.softmax(s.masked_fill(nothing, 0.0)).masked_fill(nothing, 0.0)


def packed_self_attention(qkv: torch.Tensor, heads: int, mask: torch.Tensor | None = None,
                          is_causal: bool = False) -> torch.Tensor:
    """Self-attention of ``nn.MultiheadAttention``'s packed in-projection, ``[G, T, 3*E]`` (q, k and v of
    ``G`` sequences side by side, each ``heads`` heads of ``E / heads``): ``[G, heads, T, E / heads]``,
    what :func:`attention` gives for the q, k and v that the module unbinds from it, to the same bits.

    Why: unbinding q, k and v as views, then copying each to contiguous heads, costs three copies forward
    and, backward, a strided ``stack`` of their three gradients into the projection's (measured 8 ms per
    layer of the 32-slot encoder of ``benchmarks/fused_step.py --models transformer``). Here one copy puts
    q, k and v in one contiguous ``[3, G*heads, T, E/heads]`` block, and the backward writes their
    gradients straight into one block of that layout. ``mask`` must broadcast to ``[G, heads, T, T]``
    (check with :func:`applies` on views of the heads).
    """
    g, t, e3 = qkv.shape
    hd = e3 // 3 // heads
    packed = qkv.view(g, t, 3, heads, hd).permute(2, 0, 3, 1, 4).reshape(3, g * heads, t, hd)
    return _PackedAttention.apply(packed, heads, mask, is_causal, 1.0 / math.sqrt(hd)).view(g, heads, t, hd)


class _PackedAttention(torch.autograd.Function):
    """``softmax(q k^T * scale + mask) v`` of one contiguous ``[3, M, T, D]`` block; the backward's GEMMs
    write the three gradients into one block of the same layout (the formulas of autograd's own
    backward of :func:`attention`, so the same bits)."""

    @staticmethod
    def forward(ctx, packed, heads, mask, is_causal, scale):  # noqa: ANN001, ANN205 - autograd's signature
        q, k, v = packed.unbind(0)
        s = torch.bmm(q, k.transpose(1, 2))
        s.mul_(scale)
        lead = (q.shape[0] // heads, heads)  # what the mask broadcasts against
        p = _probabilities(s, lead, mask, is_causal)
        ctx.save_for_backward(packed, p)
        ctx.lead, ctx.mask, ctx.is_causal, ctx.scale = lead, mask, is_causal, scale
        return torch.bmm(p, v)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        packed, p = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the same math in differentiable ops, graph kept
            q, k, v = packed.unbind(0)
            s = torch.bmm(q, k.transpose(1, 2)) * ctx.scale
            out = torch.bmm(_probabilities(s, ctx.lead, ctx.mask, ctx.is_causal), v)
            return torch.autograd.grad(out, packed, grad, create_graph=True)[0], None, None, None, None
        q, k, v = packed.unbind(0)
        grad = grad.contiguous()
        out = torch.empty_like(packed)
        torch.bmm(p.transpose(1, 2), grad, out=out[2])
        ds = short_softmax.softmax_backward(torch.bmm(grad, v.transpose(1, 2)), p)
        ds.mul_(ctx.scale)  # masked and "nothing" entries: p is 0 there, so ds is too, as autograd's
        torch.bmm(ds, k, out=out[0])
        torch.bmm(ds.transpose(1, 2), q, out=out[1])
        return out, None, None, None, None
