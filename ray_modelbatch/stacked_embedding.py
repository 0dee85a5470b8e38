"""``nn.Embedding`` in a stack's template: every slot's table read in place, its padding row out of the gradient.

Under ``torch.vmap`` with one table per slot, torch's batching rule for
``F.embedding`` has two faults for a stack:

- it copies every slot's whole table into one flat ``[S * V, H]`` tensor at each
  lookup (from the strided view of the flat parameter buffer), a full pass over
  the tables forward and again backward: with BERT-base's 30,522 x 768 rows,
  94 MB per slot and lookup;
- it keeps ``padding_idx`` as it is on that flat table, so only slot 0's
  padding row is left out of the backward: every other slot's padding row is
  trained (measured: a BERT classifier's ``[PAD]`` row moved 9e-3 from its solo
  run in 5 AdamW steps), where a model alone never updates it (AdamW still
  decays it).

:func:`stack_embeddings` makes each plain ``nn.Embedding`` in a stack's
template a :class:`StackedEmbedding`, whose lookup is
:func:`.stacked_lookup.lookup`: alone it is ``F.embedding`` with the padding row
out of the gradient, and under vmap it gathers from the stacked tables in place
(:func:`.stacked_lookup.stacked_lookup`), with the same values and gradients.
The user's own modules are not touched. The direct path computes these modules
with the same kernel.

:func:`dense_gradients` turns ``sparse=True`` off: a sparse gradient cannot be
stacked into the flat per-slot buffer the fused optimizers read (torch failed
with "reshape is not implemented for sparse tensors"), and it only saves memory
in a solo run: the dense gradient has the same values, so the updates are the
same.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .stacked_lookup import lookup


class StackedEmbedding(nn.Embedding):
    """``nn.Embedding`` whose lookup reads stacked tables in place under vmap and leaves the ``padding_idx``
    row out of every slot's gradient (see the module docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Embedding's own name
        return lookup(self.weight, input, -1 if self.padding_idx is None else self.padding_idx)


def stack_embeddings(model: nn.Module) -> nn.Module:
    """Make every plain ``nn.Embedding`` of ``model`` (in place) a :class:`StackedEmbedding`; those with
    ``max_norm`` or ``scale_grad_by_freq``, and subclasses of ``nn.Embedding``, keep their own forward."""
    for module in model.modules():
        # max_norm renormalizes the looked-up rows of the weight in place, and scale_grad_by_freq scales by
        # counts within one model's batch: both stay the kernel's job
        if type(module) is nn.Embedding and module.max_norm is None and not module.scale_grad_by_freq:
            module.__class__ = StackedEmbedding
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
