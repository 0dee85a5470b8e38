"""Per-slot kernels of the direct path for layers beyond Linear and convolution (see :mod:`.fast_path`).

Each function computes one layer for every slot at once from the stacked
``[n, ...]`` parameters, with the layer's own per-slot math, so a slot's
result equals the module's alone to float rounding:

* :func:`layer_norm`: one ``F.layer_norm`` without affine over all slots'
  activations (:func:`.stacked_layer_norm.normalize`), then each slot's
  scale and shift as one broadcast ``addcmul``;
* :func:`embedding`: one gather from the stacked ``[n, V, D]`` tables
  (read in place, never copied) and one pass adding the rows' gradients
  (:mod:`.stacked_lookup`);
* :func:`embedding_bag`: that gather, then each bag's sum or mean.

The activation layouts and the :class:`Act` type that the direct path passes
between steps live here too, so that :mod:`.direct_attention` can use them
without importing :mod:`.fast_path`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .stacked_layer_norm import normalize
from .stacked_lookup import gather_rows, slot_rows


class Unsupported(Exception):
    """This call cannot take the direct path (e.g. inputs that are not ``[B, features]``)."""


# A value of the traced forward is in one of three layouts:
#   "shared": [B, ...], the same for every slot (an input batch, before any parameter);
#   "slot":   [n, ...], each slot's own value stacked, slot first (what Linear layers take and every
#             output is; a parameter the forward reads itself is one too);
#   "chan":   [B, n*C, ...], the slots' channels side by side (what convolutions, BatchNorm and
#             pooling take: one kernel call over all slots, no copies between those layers).
# Any op that acts on one slot's value acts on a "slot" value as it is, with the value's dimensions
# counted after the slot dimension: that is how every kind of step keeps each slot's math its own.
SHARED, SLOT, CHAN = "shared", "slot", "chan"


@dataclass
class Act:
    """A tensor of the traced forward and its layout (see above)."""

    t: torch.Tensor
    layout: str

    def sample_shape(self, n: int) -> torch.Size:
        """The shape one slot's model sees (``x.shape`` in its forward)."""
        if self.layout == SLOT:
            return self.t.shape[1:]
        if self.layout == CHAN:
            return torch.Size((self.t.shape[0], self.t.shape[1] // n, *self.t.shape[2:]))
        return self.t.shape


def rms_norm(mod: nn.RMSNorm, h: torch.Tensor, shared: bool, weight: torch.Tensor | None) -> Act:
    """``nn.RMSNorm`` of every slot (``h`` as in :func:`layer_norm`): the normalization once over all slots,
    then each slot's weight (``F.rms_norm`` with a weight rounds the same, measured bit-equal)."""
    y = F.rms_norm(h, mod.normalized_shape, None, mod.eps)
    if weight is None:
        return Act(y, SHARED if shared else SLOT)
    return Act(y * per_slot_view(weight, h.dim() - (not shared)), SLOT)


def per_slot_view(t: torch.Tensor, rank: int) -> torch.Tensor:
    """``[n, *shape]`` viewed as ``[n, 1, ..., *shape]`` with ``rank`` dims after the slot: each slot's
    value lined up for broadcasting against others of rank ``rank``, as the model broadcasts it alone."""
    return t.view(t.shape[0], *([1] * (rank - (t.dim() - 1))), *t.shape[1:])


def layer_norm(mod: nn.LayerNorm, h: torch.Tensor, shared: bool, weight: torch.Tensor | None,
               bias: torch.Tensor | None) -> Act:
    """``nn.LayerNorm`` of every slot: ``h`` is ``[n, B, ...]``, or ``[B, ...]`` shared by every slot.

    The normalization has no parameters, so it runs once over all slots (once
    in all for a shared input); only the affine differs per slot. One batched
    call is ~3x faster than an ``F.layer_norm`` per slot (measured at n = 8 and
    32, [64, 16, 64] each, forward and backward), and ``addcmul(b, y, w)``
    rounds as ``F.layer_norm``'s own affine does (measured bit-equal, where
    ``y * w + b`` is an ulp off).
    """
    y = normalize(h, mod.normalized_shape, mod.eps)
    if weight is None and bias is None:
        return Act(y, SHARED if shared else SLOT)
    rank = h.dim() - (not shared)
    w = None if weight is None else per_slot_view(weight, rank)
    b = None if bias is None else per_slot_view(bias, rank)
    if w is None:
        return Act(y + b, SLOT)
    return Act(y * w if b is None else _SlotAffine.apply(y, w, b), SLOT)


class _SlotAffine(torch.autograd.Function):
    """``addcmul(b, y, w)`` (the per-slot affine of a norm), whose backward makes two passes over ``y``'s size.

    torch's own ``addcmul`` backward also multiplies ``y`` by its ``value``
    (1) into a third full-size tensor: a fifth of a 32-slot transformer's
    LayerNorm time. The gradients are the same numbers: ``grad * w`` and
    ``sum(grad * y)``, ``sum(grad)`` over the dimensions ``w`` and ``b`` broadcast along.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y, w)
        ctx.shapes = (w.shape, b.shape)
        return torch.addcmul(b, y, w)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, w = ctx.saved_tensors
        w_shape, b_shape = ctx.shapes
        need_y, need_w, need_b = ctx.needs_input_grad
        return (grad * w if need_y else None,
                (grad * y).sum_to_size(w_shape) if need_w else None,
                grad.sum_to_size(b_shape) if need_b else None)


def embedding(mod: nn.Embedding, w: torch.Tensor, idx: torch.Tensor, per_slot: bool) -> torch.Tensor:
    """``nn.Embedding`` of every slot (``[n, *idx_shape, D]``); plain lookups only (see :func:`embedding_ok`)."""
    return gather_rows(w, idx, per_slot, -1 if mod.padding_idx is None else mod.padding_idx)


def embedding_ok(mod: nn.Embedding | nn.EmbeddingBag) -> bool:
    """Whether the direct kernels compute ``mod`` as it computes itself.

    ``max_norm`` renormalizes rows of the weight in place during the forward
    and ``scale_grad_by_freq`` scales by counts within one model's batch;
    ``sparse`` gradients have no place in the flat gradient buffer; an
    EmbeddingBag in ``max`` mode has no kernel here.
    """
    return (mod.max_norm is None and not mod.scale_grad_by_freq and not mod.sparse
            and getattr(mod, "mode", "sum") in ("sum", "mean"))


def _bag_ids(offsets: torch.Tensor, count: int, bags: int) -> torch.Tensor:
    """For each of ``count`` looked-up rows, the index of its bag (``offsets`` per slot ``[n, bags(+1)]`` or
    shared ``[bags(+1)]``); a trailing ``include_last_offset`` entry marks the end and starts no bag."""
    positions = torch.arange(count, device=offsets.device)
    if offsets.dim() == 2:
        positions = positions.expand(offsets.shape[0], count).contiguous()
    return (torch.searchsorted(offsets[..., :bags].contiguous(), positions, right=True) - 1).clamp_(min=0)


def embedding_bag(mod: nn.EmbeddingBag, w: torch.Tensor, idx: torch.Tensor, per_slot: bool,
                  offsets: torch.Tensor | None, weights: torch.Tensor | None) -> torch.Tensor:
    """``nn.EmbeddingBag`` (mode sum or mean) of every slot: ``[n, bags, D]``.

    ``idx`` is ``[B, L]`` (B bags of L rows) or flat ``[N]`` with ``offsets``;
    each with a leading slot dimension when ``per_slot``, as are ``offsets``
    and ``per_sample_weights``. The rows are gathered with
    :func:`.stacked_lookup.gather_rows`, scaled by ``per_sample_weights`` and summed per bag;
    a mean divides by the bag's row count (an empty bag is zero, as in torch).
    ``padding_idx`` rows count for nothing. Measured on 2 shared cores (64 bags
    of 16, V = 2000, D = 64, forward and backward): 1.5 / 6.8 / 53 ms at n = 8 /
    32 / 128, against 1.9 / 7.7 / 54 ms for ``F.embedding_bag`` on a flat copy
    of the tables.
    """
    n, _, d = w.shape
    pad = -1 if mod.padding_idx is None else mod.padding_idx
    if weights is not None and mod.mode != "sum":
        raise Unsupported("per_sample_weights need mode='sum'")
    rows = gather_rows(w, idx, per_slot, pad)  # [n, *idx sample shape, D]
    keep = None if pad < 0 else (idx != pad).to(rows.dtype)  # shapes line up from the right: shared or per slot
    scale = weights if keep is None else keep if weights is None else keep * weights
    if scale is not None:
        rows = rows * scale.unsqueeze(-1)
    if idx.dim() - per_slot == 2:
        if offsets is not None:
            raise Unsupported("EmbeddingBag offsets with a 2-D input")
        total = rows.sum(-2)
        if mod.mode == "sum":
            return total
        if keep is None:  # every bag holds all L rows (a Python number: no tensor on another device)
            return total / max(idx.shape[-1], 1)
        return total / keep.sum(-1).clamp(min=1).unsqueeze(-1)
    if idx.dim() - per_slot != 1 or offsets is None:
        raise Unsupported("EmbeddingBag input that is neither [B, L] nor flat with offsets")
    bags = offsets.shape[-1] - int(mod.include_last_offset)
    ids = slot_rows(_bag_ids(offsets, idx.shape[-1], bags), n, bags, offsets.dim() == 2).reshape(-1)
    total = rows.new_zeros(n * bags, d).index_add_(0, ids, rows.reshape(-1, d))
    if mod.mode == "mean":
        ones = torch.ones(idx.shape[-1], dtype=rows.dtype, device=rows.device) if keep is None else keep
        count = rows.new_zeros(n * bags).index_add_(0, ids, ones.expand(n, idx.shape[-1]).reshape(-1))
        total = total / count.clamp_(min=1).unsqueeze(1)
    return total.view(n, bags, d)
