"""NAdam (Adam with Nesterov momentum) with per-slot hyperparameters (``torch.optim.NAdam`` semantics)."""

from __future__ import annotations

from typing import Any

import torch

from ..model_batch import ModelBatch
from .base import VectorOptimizer
from .betas import BetasMixin, beta
from .decay import apply_weight_decay, decay_kinds, weight_decay_coefficients
from .hparams import flag, learning_rate, nonneg


class NAdam(BetasMixin, VectorOptimizer):
    """NAdam over every slot of a ModelBatch in one fused update.

    Keywords and defaults are those of ``torch.optim.NAdam``; each may be one
    value or one per slot (``betas`` as for :class:`~ray_modelbatch.optim.Adam`;
    ``decoupled_weight_decay``: a bool or S bools, AdamW-style decay when true).
    Extra keywords: ``schedule``, ``plateau``, ``max_grad_norm`` and ``skip_nonfinite``.

    torch keeps ``mu_product`` (the product of the momentum schedule so far)
    per parameter; here it is per slot (``SLOT_SCALARS``), so snapshots,
    checkpoints and PBT copies carry it with the moments. It is float64 where
    torch keeps it in the default dtype (float32), a relative difference of
    about 1e-7 in the step size.
    """

    HPARAMS = {
        "lr": learning_rate(2e-3),
        "beta1": beta("beta1"),
        "beta2": beta("beta2"),
        "eps": nonneg("eps", 1e-8),
        "weight_decay": nonneg("weight_decay"),
        "momentum_decay": nonneg("momentum_decay", 4e-3),
        "decoupled_weight_decay": flag("decoupled_weight_decay"),
    }
    LR_COEFFICIENTS = ("grad_step", "avg_step")
    STATE = ("exp_avg", "exp_avg_sq")
    ROOT_STATE = "exp_avg_sq"
    SLOT_SCALARS = {"mu_product": 1.0}

    def __init__(self, mb: ModelBatch, lr: Any = 2e-3, betas: Any = (0.9, 0.999), eps: Any = 1e-8,
                 weight_decay: Any = 0.0, momentum_decay: Any = 4e-3, decoupled_weight_decay: Any = False,
                 **kwargs: Any):
        super().__init__(mb, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum_decay=momentum_decay,
                         decoupled_weight_decay=decoupled_weight_decay, **kwargs)

    def _push(self) -> None:
        super()._push()
        self._decay_kinds = decay_kinds(self._hp, self._weight_decays())

    def _coefficients(self, hp, steps, ok, lr):
        b1, b2 = hp["beta1"], hp["beta2"]
        t = steps + 1.0
        skip = ok == 0
        mu = b1 * (1.0 - 0.5 * 0.96 ** (t * hp["momentum_decay"]))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1.0) * hp["momentum_decay"]))
        mu_product = hp["mu_product"] * mu
        c: dict[str, Any] = {
            "w1": (1.0 - b1) * ok,
            "w2": (1.0 - b2) * ok,
            "bc2": torch.where(skip, 1.0, 1.0 - b2**t),
            "eps": torch.where(skip, 1.0, hp["eps"]),  # skipped slots never divide 0 by 0
            "grad_step": torch.where(skip, 0.0, lr * (1.0 - mu) / (1.0 - mu_product)),
            "avg_step": torch.where(skip, 0.0, lr * mu_next / (1.0 - mu_product * mu_next)),
            "scalars": {"mu_product": torch.where(skip, hp["mu_product"], mu_product)},
        }
        c.update(weight_decay_coefficients(hp, ok, lr, self._decay_kinds))
        return c

    def _update(self, p, g, state, c):
        g = apply_weight_decay(p, g, c)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, c["w1"])
        v.lerp_(g * g, c["w2"])
        denom = self._root(v.div(c["bc2"]), inplace=True).add_(c["eps"])
        p.sub_(torch.addcmul(g * c["grad_step"], m, c["avg_step"]).div_(denom))

