"""Per-slot values of the common torch losses, computed on ``[S, B, ...]`` outputs in one call.

The fused forward hands back every slot's outputs at once. A user's loss is
written for one model, so in general it is vmapped over slots, which costs a
fixed ~50 us per call (for small models as much as a layer). For the losses
sweeps use most (MSE, L1 and cross-entropy with their default options) the
per-slot value is one batched call with ``reduction="none"`` and a mean per
slot: the same elements averaged, so it matches a per-model loss to float
rounding. Anything else (other options, unusual target shapes) returns None
and the caller vmaps the user's function as usual.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import wide_cross_entropy
from .short_softmax import short_rows

_ELEMENTWISE_MODULES = {nn.MSELoss: F.mse_loss, nn.L1Loss: F.l1_loss}


def _elementwise(loss_fn: Callable) -> Callable | None:
    """The functional form of an elementwise loss with its default (mean) reduction, else None."""
    if loss_fn is F.mse_loss or loss_fn is F.l1_loss:
        return loss_fn
    if type(loss_fn) in _ELEMENTWISE_MODULES and loss_fn.reduction == "mean":
        return _ELEMENTWISE_MODULES[type(loss_fn)]
    return None


def _cross_entropy_ignore_index(loss_fn: Callable) -> int | None:
    """The ``ignore_index`` of a default-option cross-entropy loss, else None."""
    if loss_fn is F.cross_entropy:
        return -100
    if (type(loss_fn) is nn.CrossEntropyLoss and loss_fn.reduction == "mean" and loss_fn.weight is None
            and loss_fn.label_smoothing == 0.0):
        return loss_fn.ignore_index
    return None


def per_slot_loss(loss_fn: Callable[[Any, Any], torch.Tensor], out: Any, y: Any,
                  per_slot_targets: bool) -> torch.Tensor | None:
    """``[n]`` losses of ``loss_fn(out[i], y_i)`` for every slot, or None if ``loss_fn`` is not covered.

    ``y`` is shared by every slot, or ``[n, ...]`` with ``per_slot_targets``.
    """
    if not isinstance(out, torch.Tensor) or not isinstance(y, torch.Tensor) or out.dim() < 2:
        return None
    n = out.shape[0]
    target = y if per_slot_targets else y.unsqueeze(0).expand(n, *y.shape)
    fn = _elementwise(loss_fn)
    if fn is not None:
        if target.shape != out.shape or not target.is_floating_point():
            return None  # broadcasting targets: let torch's own function (and its warning) decide
        return fn(out, target, reduction="none").flatten(1).mean(1)
    ignore = _cross_entropy_ignore_index(loss_fn)
    if ignore is None or out.dim() != 3 or target.dtype != torch.long or target.shape != out.shape[:2]:
        return None
    losses = cross_entropy_rows(out, target, ignore)
    return losses.sum(1) / (target != ignore).sum(1)  # torch's mean counts the targets not ignored


def cross_entropy_rows(out: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``[n, B]`` cross-entropies (``reduction="none"``) of ``[n, B, C]`` logits against ``[n, B]`` class
    indices.

    Rows of a vector register or longer go to torch as ``[n*B, C]`` rows, the
    one-model layout: each slot's values are the bits of torch's call on its
    ``[B, C]`` alone. Shorter rows (a 10-class head) go as ``[n, C, B]``, whose
    kernel vectorizes across rows: 3-7x sooner on a CPU, to a rounding of
    those values (:mod:`.short_softmax`). Wide rows (a vocabulary) go through
    :mod:`.wide_cross_entropy`, torch's bits without two logits-sized tensors.
    """
    n, b, c = out.shape
    if short_rows(out):
        return F.cross_entropy(out.transpose(1, 2), target, reduction="none", ignore_index=ignore_index)
    if wide_cross_entropy.applies(out[0], target[0]):
        return wide_cross_entropy.row_losses(out.reshape(n * b, c), target.reshape(n * b), ignore_index).view(n, b)
    return F.cross_entropy(out.reshape(n * b, c), target.reshape(n * b), reduction="none",
                           ignore_index=ignore_index).view(n, b)
