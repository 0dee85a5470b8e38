"""Adagrad with per-slot learning-rate decay and initial accumulator (``torch.optim.Adagrad`` semantics)."""

from __future__ import annotations

from typing import Any

import torch

from ..model_batch import ModelBatch
from .base import VectorOptimizer
from .decay import apply_weight_decay
from .hparams import learning_rate, nonneg


class Adagrad(VectorOptimizer):
    """Adagrad over every slot of a ModelBatch in one fused update.

    Keywords and defaults are those of ``torch.optim.Adagrad``; each may be one
    value or one per slot. The accumulator ``sum`` starts at each slot's
    ``initial_accumulator_value`` (as torch fills it at construction), also
    after ``reset_slot`` and for slots added by ``resize``; setting
    ``initial_accumulator_value`` with ``set_hparams`` refills the accumulator
    of slots that have not stepped yet (torch reads it only at construction).
    Extra keywords: ``schedule``, ``plateau``, ``max_grad_norm`` and
    ``skip_nonfinite`` (see :class:`VectorOptimizer`). Sparse gradients do not
    exist here: the flat buffers are dense.
    """

    HPARAMS = {
        "lr": learning_rate(1e-2),
        "lr_decay": nonneg("lr_decay"),
        "weight_decay": nonneg("weight_decay"),
        "initial_accumulator_value": nonneg("initial_accumulator_value"),
        "eps": nonneg("eps", 1e-10),
    }
    LR_COEFFICIENTS = ("clr",)
    STATE = ("sum",)
    ROOT_STATE = "sum"
    STATE_INIT = {"sum": "initial_accumulator_value"}

    def __init__(self, mb: ModelBatch, lr: Any = 1e-2, lr_decay: Any = 0.0, weight_decay: Any = 0.0,
                 initial_accumulator_value: Any = 0.0, eps: Any = 1e-10, **kwargs: Any):
        super().__init__(mb, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps, **kwargs)

    def _push(self) -> None:
        super()._push()
        self._any_wd = any(bool((wd != 0).any()) for wd in self._weight_decays())

    def _coefficients(self, hp, steps, ok, lr):
        skip = ok == 0
        # torch: clr = lr / (1 + (step - 1) * lr_decay) with step counted after this update
        c: dict[str, Any] = {
            "clr": lr / (1.0 + steps * hp["lr_decay"]) * ok,
            "eps": torch.where(skip, 1.0, hp["eps"]),  # skipped slots never divide 0 by 0
        }
        if self._any_wd:
            c["wd"] = hp["weight_decay"] * ok
        return c

    def _update(self, p, g, state, c):
        g = apply_weight_decay(p, g, c)
        acc = state["sum"]
        acc.addcmul_(g, g)
        std = self._root(acc).add_(c["eps"])
        p.sub_(g.div(std).mul_(c["clr"]))
