"""Per-slot hyperparameter specs: a default, the rule a value must satisfy, and the broadcast to ``[S]``.

Every optimizer keyword (and every schedule/plateau parameter) becomes one
float64 ``[S]`` column. A spec carries the rule as text, so that a bad value
is reported as one line naming the slots, the rule and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import HyperparameterError


@dataclass(frozen=True)
class HParam:
    """One per-slot hyperparameter: its default and the rule it must satisfy.

    ``boolean`` marks flags (stored as 0/1) that ``get_hparams`` gives back as bools.
    """

    default: float
    check: Callable[[torch.Tensor], torch.Tensor]
    rule: str
    boolean: bool = False


def nonneg(name: str, default: float = 0.0) -> HParam:
    return HParam(default, lambda v: (v >= 0) & torch.isfinite(v), f"{name} must be a finite number >= 0")


def learning_rate(default: float) -> HParam:
    return HParam(default, lambda v: (v >= 0) & torch.isfinite(v), "lr must be a finite number >= 0")


def flag(name: str) -> HParam:
    return HParam(0.0, lambda v: (v == 0) | (v == 1), f"{name} must be a bool", boolean=True)


def unit_interval(name: str, default: float, closed: bool = True) -> HParam:
    """A value in ``[0, 1]`` (or ``[0, 1)`` with ``closed=False``, as torch requires of betas)."""
    if closed:
        return HParam(default, lambda v: (v >= 0) & (v <= 1), f"{name} must be in [0, 1]")
    return HParam(default, lambda v: (v >= 0) & (v < 1), f"{name} must be in [0, 1)")


def per_slot(name: str, value: Any, num_slots: int) -> torch.Tensor:
    """Broadcast a scalar, or check a per-slot sequence/tensor, into a float64 ``[S]`` CPU tensor."""
    if name == "max_grad_norm":  # None: no clipping, for all slots or for some (one value per slot)
        if value is None:
            value = math.inf
        elif isinstance(value, (list, tuple)):
            value = [math.inf if v is None else v for v in value]
    if isinstance(value, str):  # "inf"/"nan": how checkpoint.plain writes non-finite floats
        try:
            value = float(value)
        except ValueError:
            raise HyperparameterError(f"{name} must be a number, got {value!r}; fix the config.") from None
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if t.dim() == 0:
        return t.expand(num_slots).clone()
    if t.dim() == 1 and t.shape[0] == num_slots:
        return t.clone()
    raise HyperparameterError(
        f"{name} has shape {list(t.shape)} but the batch has {num_slots} slots. Give one value for all "
        f"slots or a sequence of exactly {num_slots} values."
    )


def per_slot_choice(name: str, value: Any, choices: tuple[str, ...], num_slots: int) -> torch.Tensor:
    """A string option (or one per slot) as the index of the choice, float64 ``[S]``."""
    values = [value] * num_slots if isinstance(value, str) else list(value)
    if len(values) != num_slots:
        raise HyperparameterError(
            f"{name} has {len(values)} values but the batch has {num_slots} slots. Give one of {list(choices)} "
            f"for all slots or a sequence of exactly {num_slots}."
        )
    bad = [v for v in values if v not in choices]
    if bad:
        raise HyperparameterError(f"{name} must be one of {list(choices)}, got {bad[0]!r}; fix the config.")
    return torch.tensor([float(choices.index(v)) for v in values], dtype=torch.float64)
