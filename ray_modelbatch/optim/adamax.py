"""Adamax (Adam with an infinity norm) with per-slot hyperparameters (``torch.optim.Adamax`` semantics)."""

from __future__ import annotations

from typing import Any

import torch

from ..model_batch import ModelBatch
from .base import VectorOptimizer
from .decay import apply_weight_decay
from .betas import BetasMixin, beta
from .hparams import learning_rate, nonneg


class Adamax(BetasMixin, VectorOptimizer):
    """Adamax over every slot of a ModelBatch in one fused update.

    Keywords and defaults are those of ``torch.optim.Adamax``; each may be one
    value or one per slot (``betas`` as for :class:`~ray_modelbatch.optim.Adam`).
    ``weight_decay`` is L2 added to the gradient, as in torch. Extra keywords:
    ``schedule``, ``plateau``, ``max_grad_norm`` and ``skip_nonfinite``.
    """

    HPARAMS = {
        "lr": learning_rate(2e-3),
        "beta1": beta("beta1"),
        "beta2": beta("beta2"),
        "eps": nonneg("eps", 1e-8),
        "weight_decay": nonneg("weight_decay"),
    }
    LR_COEFFICIENTS = ("step_size",)
    STATE = ("exp_avg", "exp_inf")

    def __init__(self, mb: ModelBatch, lr: Any = 2e-3, betas: Any = (0.9, 0.999), eps: Any = 1e-8,
                 weight_decay: Any = 0.0, **kwargs: Any):
        super().__init__(mb, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)

    def _push(self) -> None:
        super()._push()
        self._any_wd = any(bool((wd != 0).any()) for wd in self._weight_decays())

    def _coefficients(self, hp, steps, ok, lr):
        b1 = hp["beta1"]
        skip = ok == 0
        c: dict[str, Any] = {
            "w1": (1.0 - b1) * ok,
            # skipped: exp_inf = max(exp_inf * 1, |0| + 0) = exp_inf, since exp_inf >= 0
            "decay_inf": torch.where(skip, 1.0, hp["beta2"]),
            "eps": hp["eps"] * ok,
            "step_size": torch.where(skip, 0.0, lr / (1.0 - b1 ** (steps + 1.0))),
            # added to the denominator only: a skipped slot that never stepped has exp_inf = 0 (0/0)
            "guard": 1.0 - ok,
        }
        if self._any_wd:
            c["wd"] = hp["weight_decay"] * ok
        return c

    def _update(self, p, g, state, c):
        g = apply_weight_decay(p, g, c)
        m, u = state["exp_avg"], state["exp_inf"]
        m.lerp_(g, c["w1"])
        torch.maximum(u.mul_(c["decay_inf"]), g.abs().add_(c["eps"]), out=u)
        p.sub_(m.div(u.add(c["guard"])).mul_(c["step_size"]))
