"""``nn.Embedding(padding_idx=...)`` in a fused stack: the padding row gets no gradient in any slot.

A model alone never updates its embedding's ``padding_idx`` row (its gradient
is zero; AdamW still decays it). Under ``torch.vmap`` with one weight per slot,
torch's batching rule looks the rows up in one flat ``[S * V, H]`` table and
keeps ``padding_idx`` as it is, so only slot 0's padding row is left out of the
backward: every other slot's padding row is trained (measured: a BERT
classifier's ``[PAD]`` row moved 9e-3 from its solo run in 5 AdamW steps).

:func:`fix_padding_rows` makes each such embedding in a stack's template a
:class:`PaddedEmbedding`: the lookup reads the padding row through
``detach()``, so its value is the same and its gradient is exactly zero in
every slot, as alone. The user's own modules are not touched. The detached
rows are chosen by token, not by row: each position that holds
``padding_idx`` takes its vector from a lookup in the detached table. The
table itself is never copied, which with a language model's vocabulary was a
full pass over every slot's table, forward and backward (BERT's 30,522 x 768
rows: 94 MB per slot).

:func:`dense_gradients` does the same for ``sparse=True`` embeddings: a sparse
gradient cannot be stacked into the flat per-slot buffer the fused optimizers
read (torch failed with "reshape is not implemented for sparse tensors"), and
it only saves memory in a solo run: the dense gradient has the same values, so
the updates are the same.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn


class PaddedEmbedding(nn.Embedding):
    """``nn.Embedding`` whose ``padding_idx`` row is excluded from the gradient by ``detach()``, not by the
    kernel's ``padding_idx`` (which vmap applies to slot 0 only)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Embedding's own name
        out = F.embedding(input, self.weight, None, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                          self.sparse)
        if self.padding_idx is None:
            return out
        # the padding tokens' vectors (the same values) from the detached table: no gradient reaches that row
        frozen = F.embedding(input, self.weight.detach(), None, self.max_norm, self.norm_type,
                             self.scale_grad_by_freq, self.sparse)
        return torch.where((input == self.padding_idx).unsqueeze(-1), frozen, out)


def fix_padding_rows(model: nn.Module) -> nn.Module:
    """Make every ``nn.Embedding`` with a ``padding_idx`` (and no ``max_norm``) in ``model`` (in place) a
    :class:`PaddedEmbedding`; subclasses of ``nn.Embedding`` keep their own forward."""
    for module in model.modules():
        # max_norm renormalizes the looked-up rows of the weight in place, which must stay the kernel's job
        if type(module) is nn.Embedding and module.padding_idx is not None and module.max_norm is None:
            module.__class__ = PaddedEmbedding
    return model


def dense_gradients(model: nn.Module) -> nn.Module:
    """Turn ``sparse=True`` off in every ``nn.Embedding``/``nn.EmbeddingBag`` of a stack's template (in place),
    saying so once: the fused optimizers update dense per-slot buffers."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    for name in names:
        model.get_submodule(name).sparse = False
    if names:
        warnings.warn(f"{', '.join(repr(n) for n in names)}: sparse=True embeddings train with dense gradients in a "
                      "fused stack (the same values and updates; sparse gradients only save memory in a solo run). "
                      "Set sparse=False to silence this.", stacklevel=3)
    return model
