"""RMSprop with per-slot alpha, momentum, centering and weight decay (``torch.optim.RMSprop`` semantics)."""

from __future__ import annotations

from typing import Any

import torch

from ..model_batch import ModelBatch
from .base import VectorOptimizer
from .decay import apply_weight_decay
from .hparams import flag, learning_rate, nonneg, unit_interval


class RMSprop(VectorOptimizer):
    """RMSprop over every slot of a ModelBatch in one fused update.

    Keywords and defaults are those of ``torch.optim.RMSprop``; each may be one
    value or one per slot (``centered``: a bool or S bools). ``alpha`` must be
    in [0, 1] (torch only asks for >= 0, but above 1 the average of squares
    turns negative). Extra keywords: ``schedule``, ``plateau``,
    ``max_grad_norm`` and ``skip_nonfinite`` (see :class:`VectorOptimizer`).

    When some slots use momentum and others not, the latter also write their
    step direction into the shared ``momentum_buffer`` (torch keeps none for
    them); it is only read with their momentum, 0.
    """

    HPARAMS = {
        "lr": learning_rate(1e-2),
        "alpha": unit_interval("alpha", 0.99),
        "eps": nonneg("eps", 1e-8),
        "weight_decay": nonneg("weight_decay"),
        "momentum": nonneg("momentum"),
        "centered": flag("centered"),
    }
    LR_COEFFICIENTS = ("lr",)
    STATE = ("square_avg", "momentum_buffer", "grad_avg")
    ROOT_STATE = "square_avg"

    def __init__(self, mb: ModelBatch, lr: Any = 1e-2, alpha: Any = 0.99, eps: Any = 1e-8, weight_decay: Any = 0.0,
                 momentum: Any = 0.0, centered: Any = False, **kwargs: Any):
        super().__init__(mb, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                         centered=centered, **kwargs)

    def _state_names(self) -> tuple[str, ...]:
        names = ["square_avg"]
        if bool((self._hp["momentum"] != 0).any()):
            names.append("momentum_buffer")
        if bool((self._hp["centered"] == 1).any()):
            names.append("grad_avg")
        return tuple(names)

    def _push(self) -> None:
        self._any_centered = bool((self._hp["centered"] == 1).any())  # (before the base's push: _sqrt_floor reads it)
        super()._push()
        self._any_momentum = bool((self._hp["momentum"] != 0).any())
        self._any_wd = any(bool((wd != 0).any()) for wd in self._weight_decays())

    def _sqrt_floor(self):
        # (centered slots root square_avg - grad_avg**2, which rounding can make negative: torch's NaN stays)
        return None if self._any_centered else self._hp["eps"]

    def _coefficients(self, hp, steps, ok, lr):
        alpha = hp["alpha"]
        skip = ok == 0
        c: dict[str, Any] = {
            "keep": torch.where(skip, 1.0, alpha),
            "take": (1.0 - alpha) * ok,
            # A skipped slot divides its zeroed gradient by sqrt(square_avg) + 1: never 0/0.
            "eps": torch.where(skip, 1.0, hp["eps"]),
            "lr": lr * ok,
        }
        if self._any_wd:
            c["wd"] = hp["weight_decay"] * ok
        if self._any_centered:
            c["center"] = (1.0 - alpha) * ok * hp["centered"]
            # 0 for skipped slots: sqrt(square_avg) cannot be NaN, sqrt(square_avg - grad_avg**2) could round to it
            c["centered"] = hp["centered"] * ok
        if self._any_momentum:
            c["momentum"] = torch.where(skip, 1.0, hp["momentum"])
        return c

    def _update(self, p, g, state, c):
        g = apply_weight_decay(p, g, c)
        square_avg = state["square_avg"]
        square_avg.mul_(c["keep"]).addcmul_(g, g * c["take"])
        if "centered" in c:
            grad_avg = state["grad_avg"]
            grad_avg.lerp_(g, c["center"])
            avg = square_avg.addcmul(grad_avg, grad_avg * c["centered"], value=-1).sqrt_()
        else:
            avg = self._root(square_avg)
        avg.add_(c["eps"])
        if "momentum" in c:
            buf = state["momentum_buffer"]
            buf.mul_(c["momentum"]).addcdiv_(g, avg)
            p.sub_(buf * c["lr"])
        else:
            p.sub_(g.div(avg).mul_(c["lr"]))
