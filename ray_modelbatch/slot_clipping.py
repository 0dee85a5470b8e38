"""Gradient clipping by each slot's own norm, for hand-written loops over a :class:`ModelBatch`.

Why: a training loop written for one model clips with
``torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)``. Ported to a
:class:`~ray_modelbatch.ModelBatch`, the same line gets the stacked ``[S,
...]`` tensors and takes *one* norm over every slot's gradients, so each slot
is clipped by the others' gradients: its training no longer matches its model
alone (5-7% relative after 5 steps in a 3-slot MLP), and nothing says so.

So :func:`clip_grad_norm_` here is the same call for a stack: each slot's
gradients are scaled by ``min(1, max_norm / (norm_s + 1e-6))`` with ``norm_s``
that slot's norm over all its parameters, which is what torch computes for
the slot's model alone (to the last bits of the norm's summation order). It
returns the ``[S]`` norms. And :class:`StackedParameters`, the list
``ModelBatch.parameters()`` returns, refuses to be read by torch's
``clip_grad_norm_`` with one line naming this function: the habit fails loudly
instead of training every slot wrong. (``clip_grad_value_`` clamps each
element alone, so it is already per slot and is left alone.)

The optimizers' own ``max_grad_norm=`` hyperparameter clips the same way,
per slot and with a per-slot threshold, inside their step; use this function
where the loop itself clips before ``step()``.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

import torch

from .errors import HyperparameterError

__all__ = ["StackedParameters", "clip_grad_norm_"]

_TORCH_CLIP_MODULE = "torch.nn.utils.clip_grad"


class SlotClippingError(HyperparameterError, TypeError):
    """torch's ``clip_grad_norm_`` was given a stack's parameters: it would clip every slot by one shared norm."""


class StackedParameters(list):
    """The stacked ``[S, ...]`` parameters of a :class:`~ray_modelbatch.ModelBatch` (a plain list otherwise).

    Reading it from torch's ``clip_grad_norm_`` raises :class:`SlotClippingError`
    (see the module docstring); every other use is a list's.
    """

    def __iter__(self) -> Any:
        caller = sys._getframe(1)
        if caller.f_globals.get("__name__") == _TORCH_CLIP_MODULE and caller.f_code.co_name == "clip_grad_norm_":
            raise SlotClippingError(
                "torch.nn.utils.clip_grad_norm_(mb.parameters(), ...) takes one norm over every slot's gradients, so "
                "each slot would be clipped by the others'; call ray_modelbatch.clip_grad_norm_(mb.parameters(), "
                "max_norm) instead (the same arguments, each slot by its own norm), or give the optimizer "
                "max_grad_norm=.")
        return super().__iter__()


def clip_grad_norm_(parameters: Iterable[torch.Tensor] | Any, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for each slot of a stack; returns each slot's gradient norm ``[S]``.

    ``parameters``: a :class:`~ray_modelbatch.ModelBatch`, or its stacked
    tensors (``mb.parameters()``), each with the slot on dimension 0. Each
    slot's gradients are multiplied by ``min(1, max_norm / (norm + 1e-6))``
    of its own norm (``norm_type``, ``inf`` included), in place, as torch does
    for one model. Parameters without a gradient are skipped, as torch skips
    them. ``error_if_nonfinite`` raises, naming the slots, when a slot's norm
    is NaN or infinite; otherwise such a slot's gradients become NaN, as
    torch's would (the optimizers then skip that slot's step). ``foreach`` is
    accepted for torch's signature and has no effect.
    """
    del foreach  # one call per parameter either way: the per-slot norms need the slot dimension
    params = parameters.parameters() if hasattr(parameters, "parameters") else parameters
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    slots = grads[0].shape[0]
    if any(g.dim() == 0 or g.shape[0] != slots for g in grads):
        raise HyperparameterError(
            "ray_modelbatch.clip_grad_norm_ takes a stack's parameters, each with the slot on dimension 0 "
            f"(mb.parameters()); got gradients of shapes {sorted({tuple(g.shape) for g in grads})}.")
    norm_type = float(norm_type)
    device = grads[0].device
    per_param = [torch.linalg.vector_norm(g.reshape(slots, -1), norm_type, dim=1).to(device) for g in grads]
    norms = torch.linalg.vector_norm(torch.stack(per_param), norm_type, dim=0)
    if error_if_nonfinite:
        bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
        if bad:
            raise RuntimeError(f"The total norm of order {norm_type} for gradients of slots {bad} is non-finite, so "
                               "they cannot be clipped. To disable this error and scale their gradients by the "
                               "non-finite norm anyway, set `error_if_nonfinite=False`")
    coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    with torch.no_grad():
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype).view(slots, *([1] * (g.dim() - 1))))
    return norms
