"""SGD with per-slot momentum, dampening, nesterov and weight decay (``torch.optim.SGD`` semantics)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import HyperparameterError
from ..model_batch import ModelBatch
from .base import VectorOptimizer
from .decay import apply_weight_decay
from .hparams import HParam, flag, learning_rate, nonneg


class SGD(VectorOptimizer):
    """Stochastic gradient descent over every slot of a ModelBatch in one fused update.

    Keywords are those of ``torch.optim.SGD``; each may be one value or one
    per slot (``nesterov``: a bool or S bools). Extra keywords: ``schedule``,
    ``plateau``, ``max_grad_norm`` and ``skip_nonfinite`` (see :class:`VectorOptimizer`).
    """

    HPARAMS = {
        "lr": learning_rate(1e-3),
        "momentum": nonneg("momentum"),
        "dampening": HParam(0.0, lambda v: (v >= 0) & (v <= 1), "dampening must be in [0, 1]"),
        "weight_decay": nonneg("weight_decay"),
        "nesterov": flag("nesterov"),
    }
    LR_COEFFICIENTS = ("lr",)
    STATE = ("momentum_buffer",)

    def __init__(self, mb: ModelBatch, lr: Any = 1e-3, momentum: Any = 0.0, dampening: Any = 0.0,
                 weight_decay: Any = 0.0, nesterov: Any = False, **kwargs: Any):
        super().__init__(mb, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, **kwargs)

    def _check_combination(self, values, slots):
        if "nesterov" in values:
            bad = (values["nesterov"] == 1) & ((values["momentum"] <= 0) | (values["dampening"] != 0))
            if bool(bad.any()):
                raise HyperparameterError(
                    f"nesterov momentum for slot(s) {slots[bad].tolist()} needs momentum > 0 and dampening 0 "
                    "(as in torch.optim.SGD); set nesterov=False or change momentum/dampening for them."
                )

    def _state_names(self) -> tuple[str, ...]:
        return self.STATE if bool((self._hp["momentum"] != 0).any()) else ()

    def _push(self) -> None:
        super()._push()
        self._any_momentum = bool((self._hp["momentum"] != 0).any())
        self._any_nesterov = bool((self._hp["nesterov"] == 1).any())
        self._any_wd = any(bool((wd != 0).any()) for wd in self._weight_decays())

    def _coefficients(self, hp, steps, ok, lr):
        c: dict[str, Any] = {"lr": lr * ok}
        if self._any_wd:
            c["wd"] = hp["weight_decay"]
        if self._any_momentum:
            mom = hp["momentum"]
            fresh = (steps == 0) | (mom == 0)  # torch starts the buffer as a copy of the gradient
            skip = ok == 0
            c["keep"] = torch.where(skip, 1.0, torch.where(fresh, 0.0, mom))
            c["take"] = torch.where(skip, 0.0, torch.where(fresh, 1.0, 1.0 - hp["dampening"]))
            if self._any_nesterov:
                c["nesterov"] = hp["nesterov"] * mom
        return c

    def _single_pass(self, hp, steps, ok, lr):
        # torch's kernel keeps no buffer for a zero momentum; ours does once any slot has momentum, so the
        # single pass is for stacks whose slots all have momentum, or none has (all slots, not only the
        # rows stepping now: their buffers must stay what the tiled update would leave).
        kernel = getattr(torch, "_fused_sgd_", None)
        if kernel is None or len(set((self._hp["momentum"] > 0).tolist())) > 1:
            return None
        mom = hp["momentum"].tolist()
        rows = zip(ok.tolist(), lr.tolist(), mom, hp["dampening"].tolist(), hp["weight_decay"].tolist(),
                   hp["nesterov"].tolist(), steps.tolist())
        return [dict(kernel=kernel, lr=lr_, momentum=m, dampening=d, weight_decay=wd, nesterov=nest > 0,
                     is_first_step=t == 0) if good else None for good, lr_, m, d, wd, nest, t in rows]

    def _single_pass_update(self, p, g, state, slot, kwargs):
        kw = dict(kwargs)
        kernel = kw.pop("kernel")
        kernel([p[slot]], [g[slot]], [state["momentum_buffer"][slot]] if kw["momentum"] > 0 else [],
               maximize=False, **kw)

    def _update(self, p, g, state, c):
        g = apply_weight_decay(p, g, c)
        if "keep" in c:
            buf = state["momentum_buffer"]
            buf.mul_(c["keep"]).add_(g * c["take"])
            g = g.add(buf * c["nesterov"]) if "nesterov" in c else buf
            if "nesterov" in c:
                # nesterov rows use g + momentum * buf; plain rows use buf alone
                g = torch.where(c["nesterov"] > 0, g, buf)
        p.sub_(g * c["lr"])
