"""Adam and AdamW with per-slot hyperparameters (``torch.optim.Adam``/``AdamW`` semantics)."""

from __future__ import annotations

from typing import Any

import torch

from ..model_batch import ModelBatch
from .base import VectorOptimizer
from .decay import apply_weight_decay
from .betas import BetasMixin, beta
from .hparams import flag, learning_rate, nonneg


class Adam(BetasMixin, VectorOptimizer):
    """Adam over every slot of a ModelBatch in one fused update.

    Keywords are those of ``torch.optim.Adam``; each may be one value or one
    per slot (``betas``: a pair, a sequence of S pairs, or a pair of S-value
    tensors ``(beta1s, beta2s)``; ``amsgrad``: a bool or S bools). ``weight_decay`` is L2 added to the gradient, as in torch.
    Extra keywords: ``schedule`` (see :mod:`ray_modelbatch.optim.schedules`),
    ``plateau`` (:func:`~ray_modelbatch.optim.schedules.plateau`), ``max_grad_norm``
    (per-slot clipping) and ``skip_nonfinite``.
    """

    HPARAMS = {
        "lr": learning_rate(1e-3),
        "beta1": beta("beta1"),
        "beta2": beta("beta2"),
        "eps": nonneg("eps", 1e-8),
        "weight_decay": nonneg("weight_decay"),
        "amsgrad": flag("amsgrad"),
    }
    LR_COEFFICIENTS = ("step_size",)
    STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    ROOT_STATE = "exp_avg_sq"
    decoupled = False

    def __init__(
        self,
        mb: ModelBatch,
        lr: Any = 1e-3,
        betas: Any = (0.9, 0.999),
        eps: Any = 1e-8,
        weight_decay: Any = 0.0,
        amsgrad: Any = False,
        **kwargs: Any,
    ):
        super().__init__(mb, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **kwargs)

    def _state_names(self) -> tuple[str, ...]:
        used = bool((self._hp["amsgrad"] == 1).any())
        return self.STATE if used else self.STATE[:2]

    def _push(self) -> None:
        super()._push()
        ams = self._hp["amsgrad"]
        self._amsgrad = "all" if bool((ams == 1).all()) else ("some" if bool((ams == 1).any()) else "none")
        self._any_wd = any(bool((wd != 0).any()) for wd in self._weight_decays())

    def _sqrt_floor(self):
        # the root is divided by sqrt(1 - beta2**t), at least sqrt(1 - beta2) (t >= 1)
        return self._hp["eps"] * (1.0 - self._hp["beta2"]).sqrt()

    def _coefficients(self, hp, steps, ok, lr):
        b1, b2 = hp["beta1"], hp["beta2"]
        t = steps + 1.0
        skip = ok == 0
        bc1 = 1.0 - b1**t
        bc2 = 1.0 - b2**t
        c = {
            "w1": (1.0 - b1) * ok,
            "w2": (1.0 - b2) * ok,
            "step_size": torch.where(skip, 0.0, lr / bc1),
            "bc2_sqrt": torch.where(skip, 1.0, bc2.sqrt()),
            "eps": torch.where(skip, 1.0, hp["eps"]),  # skipped slots never divide 0 by 0 (eps may be 0)
            "ams": hp["amsgrad"],
        }
        if self._any_wd:
            if self.decoupled:
                c["decay"] = torch.where(skip, 1.0, 1.0 - lr * hp["weight_decay"])
            else:
                c["wd"] = hp["weight_decay"]
        return c

    def _single_pass(self, hp, steps, ok, lr):
        kernel = getattr(torch, "_fused_adamw_" if self.decoupled else "_fused_adam_", None)
        if kernel is None:
            return None
        rows = zip(ok.tolist(), lr.tolist(), hp["beta1"].tolist(), hp["beta2"].tolist(), hp["eps"].tolist(),
                   hp["weight_decay"].tolist(), hp["amsgrad"].tolist(), (steps + 1.0).tolist())
        return [dict(kernel=kernel, lr=lr_, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, amsgrad=ams > 0, step=t)
                if good else None for good, lr_, b1, b2, eps, wd, ams, t in rows]

    def _single_pass_update(self, p, g, state, slot, kwargs):
        kw = dict(kwargs)
        kernel, step, ams = kw.pop("kernel"), kw.pop("step"), kw["amsgrad"]
        kernel([p[slot]], [g[slot]], [state["exp_avg"][slot]], [state["exp_avg_sq"][slot]],
               [state["max_exp_avg_sq"][slot]] if ams else [], [torch.tensor(step, dtype=torch.float32)],
               maximize=False, **kw)

    def _update(self, p, g, state, c):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        g = apply_weight_decay(p, g, c)
        m.lerp_(g, c["w1"])
        v.lerp_(g * g, c["w2"])
        second = v
        if self._amsgrad != "none":
            vmax = state["max_exp_avg_sq"]
            torch.maximum(vmax, v, out=vmax)
            second = vmax if self._amsgrad == "all" else torch.where(c["ams"] > 0, vmax, v)
        denom = self._root(second).div_(c["bc2_sqrt"]).add_(c["eps"])
        p.sub_(m.div(denom).mul_(c["step_size"]))


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (``torch.optim.AdamW``; default ``weight_decay=1e-2``)."""

    decoupled = True

    def __init__(self, mb: ModelBatch, lr: Any = 1e-3, betas: Any = (0.9, 0.999), eps: Any = 1e-8,
                 weight_decay: Any = 1e-2, amsgrad: Any = False, **kwargs: Any):
        super().__init__(mb, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **kwargs)
