"""Attention on the direct path: ``nn.MultiheadAttention`` and SDPA (the Transformer layers built from them:
:mod:`.direct_transformer`).

Attention itself has no parameters, so every slot's attention is one call
with the slots folded into the batch: ``[n, B, T, E]`` is ``[n*B, T, E]``, one
``F.scaled_dot_product_attention`` (or one ``bmm``-softmax-``bmm``) over
``n*B`` sequences, which treats each sequence alone, exactly as one model's
call does. Only the projections differ per slot; they are the direct path's
batched GEMMs over ``[n, B*T, E]`` (the ``runner`` passed in, see
:class:`ray_modelbatch.fast_path._Runner`).

Measured on 2 shared cores (4 heads of 16, forward and backward): one SDPA
call on the folded batch takes 8.9 / 32 ms at n = 8 / 32 slots of 64 sequences
of 16 tokens, against 12.7 / 137 ms for one call per slot. Short sequences
gain once more: torch's CPU flash kernel spends a fixed few microseconds on
each (sequence, head), which the folded batch has thousands of, so on a CPU
calls of up to ``small_attention.MAX_LEN`` tokens without dropout run as
``bmm``-softmax-``bmm`` on contiguous copies of q, k and v
(:mod:`.small_attention`: half SDPA's time at 16 tokens, level at 64). They
match the model's own SDPA call to fp32 rounding, not bit for bit; longer
ones keep SDPA. Self-attention that asks for no weights (what
``nn.TransformerEncoderLayer`` asks for) takes the packed form there: one copy
of the whole in-projection into heads, and a backward that writes q's, k's and
v's gradients into one block, the same bits as the unbound form.

The math follows ``F.multi_head_attention_forward`` step for step: the same
mask canonicalization and merging, ``q * sqrt(1/d)`` then ``baddbmm`` when
the weights are returned, SDPA when not (what ``nn.TransformerEncoderLayer``
asks for).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import short_softmax, small_attention
from .direct_kernels import SHARED, SLOT, Act, Unsupported


def mha_ok(mod: nn.MultiheadAttention) -> bool:
    """Whether :func:`multihead_attention` computes ``mod``: no ``bias_k``/``bias_v`` or zero attention
    (rarely used; they append a key to every sequence). Batch-first or not."""
    return mod.bias_k is None and mod.bias_v is None and not mod.add_zero_attn


def _batch_first(a: Act) -> Act:
    """A sequence-first ``[T, B, E]`` input (each slot's) as the ``[B, T, E]`` view the attention computes on."""
    return Act(a.t.transpose(0, 1) if a.layout == SHARED else a.t.transpose(1, 2), a.layout)


def _canonical(mask: Act | None, name: str, other: Act | None, dtype: torch.dtype, check: bool = True) -> Act | None:
    """``F._canonical_mask`` (a bool mask becomes 0 / -inf in ``dtype``), keeping the mask's layout."""
    if mask is None:
        return None
    t = F._canonical_mask(mask=mask.t, mask_name=name, other_type=None if other is None else other.t.dtype,
                          other_name="", target_type=dtype, check_other=check)
    return Act(t, mask.layout)


def _fold(a: Act, n: int) -> torch.Tensor:
    """A per-sample tensor with the batch first (``[B, ...]``) as ``[n*B, ...]``, slot-major."""
    if a.layout == SLOT:
        return a.t.flatten(0, 1)
    if a.layout == SHARED:
        return a.t.repeat(n, *([1] * (a.t.dim() - 1)))
    raise Unsupported(f"an attention input in the {a.layout!r} layout")


def _fold_attn_mask(mask: Act, n: int) -> torch.Tensor:
    """An ``attn_mask`` as the folded batch sees it: a ``[T, S]`` one as torch takes it (``[1, T, S]``),
    a ``[B*heads, T, S]`` one (a mask per sequence and head) folded with the batch."""
    rank = mask.t.dim() - (mask.layout == SLOT)
    if rank == 2 and mask.layout == SHARED:
        return mask.t.unsqueeze(0)
    if rank == 3:
        return _fold(mask, n)
    raise Unsupported("an attn_mask that is neither [T, S] nor [batch * heads, T, S]")


def _project(runner: Any, name: str, x: Act, lo: int, hi: int) -> torch.Tensor:
    """Rows ``lo:hi`` of the packed in-projection applied to ``x``: ``[n, B, T, hi-lo]``. The whole
    projection writes its gradients into the flat buffer like any Linear (see ``fast_path.GradTarget``)."""
    w, b = runner.params[f"{name}.in_proj_weight"], runner.params.get(f"{name}.in_proj_bias")
    whole = lo == 0 and hi == w.shape[1]
    return runner.project(x, w if whole else w[:, lo:hi], None if b is None else b if whole else b[:, lo:hi],
                          f"{name}.in_proj_weight" if whole else None, f"{name}.in_proj_bias" if whole else None)


def _in_projection(runner: Any, name: str, mod: nn.MultiheadAttention, query: Act, key: Act,
                   value: Act) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v for every slot, ``[n, B, T, E]`` each: one GEMM per slot for self-attention, as
    ``F._in_projection_packed``; separate ones for other queries or ``kdim``/``vdim``."""
    e = mod.embed_dim
    if not mod._qkv_same_embed_dim:
        b = runner.params.get(f"{name}.in_proj_bias")
        bq, bk, bv = (None, None, None) if b is None else (b[:, :e], b[:, e:2 * e], b[:, 2 * e:])
        return (runner.project(query, runner.params[f"{name}.q_proj_weight"], bq),
                runner.project(key, runner.params[f"{name}.k_proj_weight"], bk),
                runner.project(value, runner.params[f"{name}.v_proj_weight"], bv))
    # unbind, not three slices: its backward stacks the three gradients, where each slice's backward would
    # zero-fill a gradient of the whole projection
    if query is key and key is value:
        return _project(runner, name, query, 0, 3 * e).unflatten(-1, (3, e)).unbind(-2)
    q = _project(runner, name, query, 0, e)
    if key is value:
        return (q, *_project(runner, name, key, e, 3 * e).unflatten(-1, (2, e)).unbind(-2))
    return q, _project(runner, name, key, e, 2 * e), _project(runner, name, value, 2 * e, 3 * e)


def multihead_attention(runner: Any, name: str, mod: nn.MultiheadAttention, query: Act, key: Act, value: Act,
                        key_padding_mask: Act | None = None, need_weights: bool = True,
                        attn_mask: Act | None = None, average_attn_weights: bool = True,
                        is_causal: bool = False) -> tuple[Act, Act | None]:
    """``nn.MultiheadAttention`` of every slot: ``(output, weights or None)``, slot layout.

    A sequence-first module (``batch_first=False``, torch's default) computes on ``[B, T, E]`` views of its
    ``[T, B, E]`` inputs, the same math, and returns its time-major result as it is: the ``[T, B, E]`` tensor
    the module returns, in the memory order a dropout after it draws its mask in.
    """
    n, heads = runner.n, mod.num_heads
    if len(query.sample_shape(n)) != 3:
        raise Unsupported("MultiheadAttention on inputs that are not [batch, seq, embed]")
    if not mod.batch_first:  # (each transposed once, so that a self-attention's three inputs stay one object)
        q_in = _batch_first(query)
        k_in = q_in if key is query else _batch_first(key)
        value = q_in if value is query else k_in if value is key else _batch_first(value)
        query, key = q_in, k_in
    dtype = query.t.dtype
    # MultiheadAttention.forward, then F.multi_head_attention_forward: bool masks become -inf masks.
    key_padding_mask = _canonical(key_padding_mask, "key_padding_mask", attn_mask, dtype)
    attn_mask = _canonical(attn_mask, "attn_mask", None, dtype, check=False)
    if is_causal and attn_mask is None:
        raise Unsupported("is_causal without an attn_mask")  # torch raises; vmap's path says so
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # SDPA's is_causal replaces the mask
    elif key_padding_mask is not None:
        is_causal = False
    packed = None
    if query is key and key is value and mod._qkv_same_embed_dim and not need_weights:
        packed = _project(runner, name, query, 0, 3 * mod.embed_dim)  # [n, B, T, 3E]
        q, k, v = packed.unflatten(-1, (3, mod.embed_dim)).unbind(-2)
    else:
        q, k, v = _in_projection(runner, name, mod, query, key, value)
    batch, tgt, src = q.shape[1], q.shape[2], k.shape[2]
    hd = mod.embed_dim // heads
    # [n, B, T, E] -> [n*B, heads, T, hd]: every slot's sequences are sequences of one big batch
    q, k, v = (t.reshape(n * batch, t.shape[2], heads, hd).transpose(1, 2) for t in (q, k, v))
    mask = None if attn_mask is None else _fold_attn_mask(attn_mask, n)
    if key_padding_mask is not None:
        kpm = _fold(key_padding_mask, n).reshape(n * batch, 1, 1, src).expand(-1, heads, -1, -1).reshape(-1, 1, src)
        mask = kpm if mask is None else mask + kpm
    dropout_p = mod.dropout if mod.training else 0.0
    weights = None
    if need_weights:
        qs = q.reshape(-1, tgt, hd) * math.sqrt(1.0 / float(hd))
        kt = k.reshape(-1, src, hd).transpose(-2, -1)
        w = torch.bmm(qs, kt) if mask is None else torch.baddbmm(mask, qs, kt)
        w = short_softmax.softmax(w).contiguous()  # torch's layout: a dropout draws its mask in memory order
        if dropout_p > 0.0:  # each slot's [B*heads, T, S] weights, as its module drops them
            w = runner.dropout(Act(w.view(n, -1, tgt, src), SLOT), dropout_p).t.view(n * batch * heads, tgt, src)
        out = torch.bmm(w, v.reshape(-1, src, hd)).view(n * batch, heads, tgt, hd)
        w = w.view(n, batch, heads, tgt, src)
        weights = Act(w.mean(dim=2) if average_attn_weights else w, SLOT)
    else:
        if mask is not None:
            mask = mask.unsqueeze(0) if mask.size(0) == 1 and mask.dim() == 3 else mask.view(n * batch, heads, -1, src)
        if packed is not None and small_attention.applies(q, k, v, mask, dropout_p):
            # q, k, v above stay unused (no gradient reaches their views)
            out = small_attention.packed_self_attention(packed.view(n * batch, tgt, -1), heads, mask, is_causal)
        else:
            out = _folded_sdpa(runner, n, q, k, v, mask, dropout_p, is_causal)
    # [n*B, heads, T, hd] -> [n, T, B, E]: time-major, as the module computes its output projection, and returned
    # as the [n, B, T, E] view of it that the module returns. A dropout on it draws its mask in memory order
    # (empty_like keeps these strides), so the next dropout draws each slot's mask as its model's own does.
    out = out.view(n, batch, heads, tgt, hd).permute(0, 3, 1, 2, 4).reshape(n, tgt, batch, mod.embed_dim)
    out = runner.linear(f"{name}.out_proj", Act(out, SLOT)).t
    return Act(out.transpose(1, 2) if mod.batch_first else out, SLOT), weights


def _folded_sdpa(runner: Any, n: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 dropout_p: float, is_causal: bool, **kwargs: Any) -> torch.Tensor:
    """SDPA on the slots folded into the batch (``[n*B, ...]``); with dropout one call per slot, each with
    the slot's generator (SDPA takes none), so each slot draws its model's own attention dropout."""
    dropout_p = runner.rate(dropout_p)  # a dropout module's p: one rate, or each slot's (see slot_dropout)
    if small_attention.applies(q, k, v, mask, dropout_p, kwargs.get("enable_gqa", False)):
        return small_attention.attention(q, k, v, mask, is_causal, kwargs.get("scale"))
    if dropout_p == 0.0 or runner.random is None:
        return F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal, **kwargs)
    per_slot = mask is not None and mask.dim() == q.dim() and mask.shape[0] == q.shape[0]
    split = lambda t: t.view(n, -1, *t.shape[1:])  # noqa: E731 - [n*B, ...] -> [n, B, ...]
    fn = lambda q_, k_, v_, m_, p_: F.scaled_dot_product_attention(q_, k_, v_, m_, p_, is_causal, **kwargs)  # noqa: E731
    masks = split(mask) if per_slot else [mask] * n
    rates = dropout_p if isinstance(dropout_p, list) else [dropout_p] * n
    return runner.per_slot_random(fn, split(q), split(k), split(v), masks, rates).flatten(0, 1)


def sdpa(runner: Any, q: Act, k: Act, v: Act, attn_mask: Act | None = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Act:
    """``F.scaled_dot_product_attention`` of every slot as one call on the slots folded into the batch.

    SDPA treats every leading index alone, so ``[n*B, ...]`` gives each slot
    what its model's own call gives it. A mask with the batch dimension (as
    many dims as q) is folded with the inputs; a smaller one broadcasts as it
    is. Inputs shared by every slot need one call on the batch itself, unless
    dropout must draw a mask per slot.
    """
    n = runner.n
    acts = (q, k, v) if attn_mask is None else (q, k, v, attn_mask)
    dropout_p = runner.rate(dropout_p)  # a dropout module's p: one rate, or each slot's (see slot_dropout)
    if dropout_p == 0.0 and all(a.layout == SHARED for a in acts):
        return Act(F.scaled_dot_product_attention(q.t, k.t, v.t, None if attn_mask is None else attn_mask.t,
                                                  dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa), SHARED)
    if len(q.sample_shape(n)) < 3:
        raise Unsupported("scaled_dot_product_attention on inputs without a batch dimension")
    mask = None if attn_mask is None else _fold_sdpa_mask(attn_mask, n, len(q.sample_shape(n)))
    out = _folded_sdpa(runner, n, _fold(q, n), _fold(k, n), _fold(v, n), mask, dropout_p, is_causal, scale=scale,
                       enable_gqa=enable_gqa)
    return Act(out.view(n, -1, *out.shape[1:]), SLOT)


def _fold_sdpa_mask(mask: Act, n: int, rank: int) -> torch.Tensor:
    """An SDPA ``attn_mask`` for the folded batch: folded if it has the batch dimension (the rank of q and
    not a broadcast size-1 batch), as it is if it has none."""
    if mask.layout == SLOT or (mask.layout == SHARED and mask.t.dim() == rank and mask.t.shape[0] != 1):
        if len(mask.sample_shape(n)) != rank:
            raise Unsupported("a per-slot attention mask without a batch dimension")
        return _fold(mask, n)
    if mask.layout == SHARED:
        return mask.t
    raise Unsupported(f"an attention mask in the {mask.layout!r} layout")
