"""Per-slot learning-rate schedules as pure functions of each slot's step count.

A schedule is a description (kind plus parameters), not an object with its own
counter: the optimizer owns each slot's step count, so a schedule's position
is checkpointed, copied (PBT) and reset together with the optimizer state.

At a slot's step ``t`` (the number of updates it has already taken) the
learning rate is ``lr * factor(t)``, exactly as ``torch.optim.lr_scheduler``
gives it when ``scheduler.step()`` follows every ``optimizer.step()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Collection

import torch

KINDS = ("constant", "step", "warmup_cosine")

# Parameters every schedule row carries; unused ones keep their defaults.
PARAM_DEFAULTS: dict[str, float] = {
    "step_size": 1.0,
    "gamma": 1.0,
    "warmup_steps": 0.0,
    "total_steps": 1.0,
    "min_lr_ratio": 0.0,
}


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule; each parameter is a scalar or a per-slot sequence."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; use one of {KINDS}")
        unknown = set(self.params) - set(PARAM_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown schedule parameters {sorted(unknown)} for {self.kind!r}")


def constant() -> Schedule:
    """Keep the optimizer's learning rate."""
    return Schedule("constant")


def step_decay(step_size: Any, gamma: Any = 0.1) -> Schedule:
    """Multiply the learning rate by ``gamma`` every ``step_size`` steps (``torch.optim.lr_scheduler.StepLR``)."""
    return Schedule("step", {"step_size": step_size, "gamma": gamma})


def warmup_cosine(total_steps: Any, warmup_steps: Any = 0, min_lr_ratio: Any = 0.0) -> Schedule:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``.

    Warmup factor at step ``t < warmup_steps`` is ``(t + 1) / warmup_steps``.
    With ``warmup_steps=0`` this is ``CosineAnnealingLR(T_max=total_steps,
    eta_min=min_lr_ratio * lr)``; after ``total_steps`` the rate stays at the minimum.
    """
    return Schedule("warmup_cosine", {"total_steps": total_steps, "warmup_steps": warmup_steps,
                                      "min_lr_ratio": min_lr_ratio})


def factor(kind: torch.Tensor, t: torch.Tensor, p: dict[str, torch.Tensor], present: Collection[str]) -> torch.Tensor:
    """Vectorized learning-rate factor for every slot (tensors are ``[S]`` float64).

    ``present`` names the kinds in use, known on the host, so that no branch
    needs a device sync to find out.
    """
    out = torch.ones_like(t)
    if "step" in present:
        step_rows = kind == KINDS.index("step")
        out = torch.where(step_rows, p["gamma"] ** torch.floor(t / p["step_size"]), out)
    if "warmup_cosine" in present:
        cos_rows = kind == KINDS.index("warmup_cosine")
        warm = p["warmup_steps"]
        span = torch.clamp(p["total_steps"] - warm, min=1.0)
        progress = torch.clamp((t - warm) / span, 0.0, 1.0)
        r = p["min_lr_ratio"]
        cosine = r + (1.0 - r) * 0.5 * (1.0 + torch.cos(math.pi * progress))
        warmup = (t + 1.0) / torch.clamp(warm, min=1.0)
        out = torch.where(cos_rows, torch.where(t < warm, warmup, cosine), out)
    return out


def validate(name: str, values: torch.Tensor) -> str | None:
    """Return the rule a schedule parameter breaks, or None."""
    rules = {
        "step_size": (values >= 1, "step_size must be >= 1"),
        "gamma": (values > 0, "gamma must be > 0"),
        "warmup_steps": (values >= 0, "warmup_steps must be >= 0"),
        "total_steps": (values >= 1, "total_steps must be >= 1"),
        "min_lr_ratio": ((values >= 0) & (values <= 1), "min_lr_ratio must be in [0, 1]"),
    }
    ok, rule = rules[name]
    return None if bool(ok.all()) else rule
