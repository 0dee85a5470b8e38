"""Adam and AdamW with per-slot hyperparameters (``torch.optim.Adam``/``AdamW`` semantics)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..model_batch import ModelBatch
from .base import HParam, VectorOptimizer, _nonneg, per_slot
from ..errors import HyperparameterError


def _beta(name: str) -> HParam:
    return HParam(0.9 if name == "beta1" else 0.999, lambda v: (v >= 0) & (v < 1), f"{name} must be in [0, 1)")


class Adam(VectorOptimizer):
    """Adam over every slot of a ModelBatch in one fused update.

    Keywords are those of ``torch.optim.Adam``; each may be one value or one
    per slot (``betas``: a pair, a sequence of S pairs, or a pair of S-value
    tensors ``(beta1s, beta2s)``; ``amsgrad``: a bool or S bools). ``weight_decay`` is L2 added to the gradient, as in torch.
    Extra keywords: ``schedule`` (see :mod:`ray_modelbatch.optim.schedules`),
    ``max_grad_norm`` (per-slot clipping) and ``skip_nonfinite``.
    """

    HPARAMS = {
        "lr": HParam(1e-3, lambda v: (v >= 0) & torch.isfinite(v), "lr must be a finite number >= 0"),
        "beta1": _beta("beta1"),
        "beta2": _beta("beta2"),
        "eps": _nonneg("eps"),
        "weight_decay": _nonneg("weight_decay"),
        "amsgrad": HParam(0.0, lambda v: (v == 0) | (v == 1), "amsgrad must be a bool"),
    }
    STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
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

    def public_hparams(self) -> list[str]:
        return ["lr", "betas", "eps", "weight_decay", "amsgrad", "max_grad_norm", "schedule"]

    def _expand(self, hparams: Mapping[str, Any], num_slots: int) -> dict[str, torch.Tensor]:
        hparams = dict(hparams)
        out = {}
        if "betas" in hparams:
            raw = hparams.pop("betas")
            if (isinstance(raw, (tuple, list)) and len(raw) == 2 and all(isinstance(t, torch.Tensor) for t in raw)
                    and all(t.dim() == 1 for t in raw) and raw[0].numel() == raw[1].numel()):
                raw = torch.stack([t.detach().double().cpu() for t in raw], dim=1)  # (beta1s, beta2s): columns
            b = torch.as_tensor(raw, dtype=torch.float64)
            if b.shape == (2,):
                b = b.unsqueeze(0).expand(num_slots, 2)
            if b.shape != (num_slots, 2):
                raise HyperparameterError(
                    f"betas has shape {list(b.shape)}; give one pair (beta1, beta2) for all slots, a "
                    f"sequence of {num_slots} pairs (one per slot), or two tensors of {num_slots} values "
                    "(beta1 per slot, beta2 per slot)."
                )
            out["beta1"], out["beta2"] = b[:, 0].clone(), b[:, 1].clone()
        out.update(super()._expand(hparams, num_slots))
        return out

    def _collapse(self, row: dict[str, float]) -> dict[str, Any]:
        row["betas"] = (row.pop("beta1"), row.pop("beta2"))
        row["amsgrad"] = bool(row["amsgrad"])
        return row

    def _state_names(self) -> tuple[str, ...]:
        used = bool((self._hp["amsgrad"] == 1).any())
        return self.STATE if used else self.STATE[:2]

    def _push(self) -> None:
        super()._push()
        ams = self._hp["amsgrad"]
        self._amsgrad = "all" if bool((ams == 1).all()) else ("some" if bool((ams == 1).any()) else "none")
        self._any_wd = bool((self._hp["weight_decay"] != 0).any())

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
            "eps": hp["eps"],
            "ams": hp["amsgrad"],
        }
        if self._any_wd:
            if self.decoupled:
                c["decay"] = torch.where(skip, 1.0, 1.0 - lr * hp["weight_decay"])
            else:
                c["wd"] = hp["weight_decay"]
        return c

    def _update(self, p, g, state, c):
        m, v = state["exp_avg"], state["exp_avg_sq"]
        if "decay" in c:
            p.mul_(c["decay"])
        if "wd" in c:
            g = g.add(p * c["wd"])
        m.lerp_(g, c["w1"])
        v.lerp_(g * g, c["w2"])
        second = v
        if self._amsgrad != "none":
            vmax = state["max_exp_avg_sq"]
            torch.maximum(vmax, v, out=vmax)
            second = vmax if self._amsgrad == "all" else torch.where(c["ams"] > 0, vmax, v)
        denom = second.sqrt().div_(c["bc2_sqrt"]).add_(c["eps"])
        p.sub_(m.div(denom).mul_(c["step_size"]))


class AdamW(Adam):
    """AdamW: Adam with decoupled weight decay (``torch.optim.AdamW``; default ``weight_decay=1e-2``)."""

    decoupled = True

    def __init__(self, mb: ModelBatch, lr: Any = 1e-3, betas: Any = (0.9, 0.999), eps: Any = 1e-8,
                 weight_decay: Any = 1e-2, amsgrad: Any = False, **kwargs: Any):
        super().__init__(mb, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, **kwargs)
