"""RAdam (rectified Adam) with per-slot hyperparameters (``torch.optim.RAdam`` semantics)."""

from __future__ import annotations

from typing import Any

import torch

from ..model_batch import ModelBatch
from .base import VectorOptimizer
from .betas import BetasMixin, beta
from .decay import apply_weight_decay, decay_kinds, weight_decay_coefficients
from .hparams import flag, learning_rate, nonneg


class RAdam(BetasMixin, VectorOptimizer):
    """RAdam over every slot of a ModelBatch in one fused update.

    Keywords and defaults are those of ``torch.optim.RAdam``; each may be one
    value or one per slot (``betas`` as for :class:`~ray_modelbatch.optim.Adam`;
    ``decoupled_weight_decay``: a bool or S bools). Extra keywords:
    ``schedule``, ``plateau``, ``max_grad_norm`` and ``skip_nonfinite``.

    Each slot switches from the plain momentum step to the rectified adaptive
    step at its own step count (when the SMA length ``rho_t`` exceeds 5), as
    torch does per parameter: one update with per-slot coefficients, no branch.
    """

    HPARAMS = {
        "lr": learning_rate(1e-3),
        "beta1": beta("beta1"),
        "beta2": beta("beta2"),
        "eps": nonneg("eps", 1e-8),
        "weight_decay": nonneg("weight_decay"),
        "decoupled_weight_decay": flag("decoupled_weight_decay"),
    }
    LR_COEFFICIENTS = ("adaptive_step", "plain_step")
    STATE = ("exp_avg", "exp_avg_sq")
    ROOT_STATE = "exp_avg_sq"

    def __init__(self, mb: ModelBatch, lr: Any = 1e-3, betas: Any = (0.9, 0.999), eps: Any = 1e-8,
                 weight_decay: Any = 0.0, decoupled_weight_decay: Any = False, **kwargs: Any):
        super().__init__(mb, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay, **kwargs)

    def _push(self) -> None:
        super()._push()
        self._decay_kinds = decay_kinds(self._hp, self._weight_decays())

    def _coefficients(self, hp, steps, ok, lr):
        b1, b2 = hp["beta1"], hp["beta2"]
        t = steps + 1.0
        bc1 = 1.0 - b1**t
        bc2 = 1.0 - b2**t
        rho_inf = 2.0 / (1.0 - b2) - 1.0
        rho_t = rho_inf - 2.0 * t * b2**t / bc2
        rect = ((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)).sqrt()
        adaptive = (rho_t > 5.0) & (ok > 0)
        plain = (rho_t <= 5.0) & (ok > 0)
        c: dict[str, Any] = {
            "w1": (1.0 - b1) * ok,
            "w2": (1.0 - b2) * ok,
            # update = exp_avg * (adaptive_step / (sqrt(exp_avg_sq) + eps) + plain_step); a row uses one of the two
            "adaptive_step": torch.where(adaptive, lr * rect * bc2.sqrt() / bc1, 0.0),
            "plain_step": torch.where(plain, lr / bc1, 0.0),
            # rows without the adaptive term divide by sqrt(exp_avg_sq) + 1: never 0/0 (eps may be 0)
            "eps": torch.where(adaptive, hp["eps"], 1.0),
        }
        c.update(weight_decay_coefficients(hp, ok, lr, self._decay_kinds))
        return c

    def _update(self, p, g, state, c):
        g = apply_weight_decay(p, g, c)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, c["w1"])
        v.lerp_(g * g, c["w2"])
        step = self._root(v).add_(c["eps"]).reciprocal_().mul_(c["adaptive_step"]).add_(c["plain_step"])
        p.sub_(m * step)
