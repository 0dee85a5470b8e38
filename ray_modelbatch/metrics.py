"""Per-example metrics for :meth:`FusedEngine.evaluate` and the :class:`~ray_modelbatch.trainer.Trainer`.

Each function is written for ONE model's output ``[B, ...]`` and returns one
value per example ``[B]``; the engine vmaps it over slots. Per-example values
(rather than a batch mean) are what lets the engine average correctly over
chunks of unequal size and over padded per-slot validation sets (k-fold),
where a mask says which examples count.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["accuracy", "cross_entropy", "mse", "slot_batched"]


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1.0 where ``argmax(logits)`` equals the class index ``target``, else 0.0; ``[B]`` float."""
    return (logits.argmax(dim=-1) == target).to(torch.float32)


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example (``reduction='none'``), ``[B]``; computed in fp32 under autocast."""
    return F.cross_entropy(logits.float(), target, reduction="none")


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each example over its non-batch dimensions, ``[B]``.

    A target with the prediction's number of elements but another shape (``[B]``
    against ``[B, 1]``) is reshaped first: broadcasting those would silently
    compare every prediction with every target.
    """
    pred = pred.float()
    target = target.to(pred.dtype)
    if target.shape != pred.shape and target.numel() == pred.numel():
        target = target.reshape(pred.shape)
    err = (pred - target).square()
    return err.reshape(err.shape[0], -1).mean(dim=1) if err.dim() > 1 else err


# ------------------------------------------------------------ every slot at once
# The engine calls these with the outputs of every slot, ``[n, B, ..., C]``, and the targets shared by every
# slot (``[B, ...]``) or one set per slot (``[n, B, ...]``), instead of vmapping the one-model form: a vmap
# call is a fixed ~0.45 ms of Python, paid at every evaluation of a sweep's stack (a digits MLP's whole
# evaluation is ~1 ms). Each returns what the vmapped one-model form returns, value for value, or None when
# the shapes are not the plain classification ones, and the engine vmaps the one-model form instead.
def _class_targets(out: Any, target: Any, per_slot_targets: bool) -> bool:
    if not isinstance(out, torch.Tensor) or not isinstance(target, torch.Tensor) or out.dim() < 3:
        return False
    want = out.shape[:-1] if per_slot_targets else out.shape[1:-1]
    return target.shape == want and not target.is_floating_point() and not target.is_complex()


def _accuracy_slots(out: Any, target: Any, per_slot_targets: bool) -> torch.Tensor | None:
    if not _class_targets(out, target, per_slot_targets):
        return None
    return (out.argmax(dim=-1) == target).to(torch.float32)  # a shared target broadcasts over the slots


def _cross_entropy_slots(out: Any, target: Any, per_slot_targets: bool) -> torch.Tensor | None:
    if not _class_targets(out, target, per_slot_targets) or out.dim() != 3:
        return None
    n, b, c = out.shape
    target = target if per_slot_targets else target.expand(n, b)
    # [n*B, C] rows, as one model's [B, C]: the same kernel on the same row layout as the one-model form
    return F.cross_entropy(out.float().reshape(n * b, c), target.reshape(n * b), reduction="none").view(n, b)


_SLOT_BATCHED: dict[Callable, Callable[[Any, Any, bool], torch.Tensor | None]] = {
    accuracy: _accuracy_slots,
    cross_entropy: _cross_entropy_slots,
}


def slot_batched(fn: Callable, out: Any, target: Any, per_slot_targets: bool) -> torch.Tensor | None:
    """``fn(out[i], target_i)`` for every slot ``i`` in one call, for this module's metrics; None for any
    other function or shape (the caller vmaps ``fn``)."""
    form = _SLOT_BATCHED.get(fn)
    return None if form is None else form(out, target, per_slot_targets)
