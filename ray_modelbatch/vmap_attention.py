"""``F.scaled_dot_product_attention`` inside a stack's vmap as batched GEMMs, not one kernel call per slot.

Why: torch's CPU attention kernel (``_scaled_dot_product_flash_attention_for_cpu``)
has no vmap batching rule, so under ``torch.vmap`` torch runs it once per slot
(and warns of a "performance drop"). Every ``nn.MultiheadAttention`` calls it,
so every attention model that runs on vmap paid that loop: models off the
direct path (``nn.Transformer``, ``nn.TransformerDecoder``) and every user
``train_step``, which always runs on vmap. In a 32-slot ``nn.Transformer``
step the per-slot calls took about 35% of the step (session 40, ``torch.profiler``).

How: while a stack's vmapped function runs (:func:`batched_sdpa`), the name
``torch.nn.functional.scaled_dot_product_attention`` (the one
``MultiheadAttention``'s forward calls) computes calls on batched tensors that
:func:`.small_attention.applies` to (CPU, no dropout, short sequences) as
:func:`.small_attention.attention`: ``softmax(q k^T * scale + mask) v`` in plain
ops, which vmap batches over the slots. The same math as the kernel, to fp32
rounding. Every other call, and every call outside a stack's vmap, goes to
torch's function unchanged; torch's function is always put back.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import small_attention
from .name_swap import NameSwap

__all__ = ["batched_sdpa"]

_TORCH_SDPA = F.scaled_dot_product_attention
_is_batched = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
          dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
          enable_gqa: bool = False) -> torch.Tensor:
    # A stack's per-slot dropout rate (slot_dropout.SlotRate, a float that refuses to be read as one number)
    # is never zero here: such calls draw, and slot_random runs them per slot with each slot's generator.
    no_dropout = type(dropout_p) in (int, float) and dropout_p == 0
    # Only a vmap's batched tensors; an fx trace's Proxies (another thread may trace while this is in F's name)
    # go to torch's function, which the trace then records as itself.
    batched = _is_batched is not None and any(isinstance(t, torch.Tensor) and _is_batched(t)
                                              for t in (query, key, value))
    if (no_dropout and batched
            and small_attention.applies(query, key, value, attn_mask, 0.0, enable_gqa)):
        return small_attention.attention(query, key, value, attn_mask, is_causal, scale)
    return _TORCH_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                       scale=scale, enable_gqa=enable_gqa)


_SWAP = NameSwap(F, "scaled_dot_product_attention", _sdpa)


def batched_sdpa() -> contextlib.AbstractContextManager[None]:
    """Within this block, SDPA calls on a vmap's batched tensors run as batched GEMMs (module docstring).
    Nests, and holds across threads: torch's function is back once the last block ends."""
    return _SWAP.block()


def active() -> bool:
    """Whether a :func:`batched_sdpa` block is open (for tests)."""
    return _SWAP.active
