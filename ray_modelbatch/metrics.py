"""Per-example metrics for :meth:`FusedEngine.evaluate` and the :class:`~ray_modelbatch.trainer.Trainer`.

Each function is written for ONE model's output ``[B, ...]`` and returns one
value per example ``[B]``; the engine vmaps it over slots. Per-example values
(rather than a batch mean) are what lets the engine average correctly over
chunks of unequal size and over padded per-slot validation sets (k-fold),
where a mask says which examples count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["accuracy", "cross_entropy", "mse"]


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
