"""The ``betas`` keyword of the Adam family: one pair, a pair per slot, or two per-slot tensors.

Inside the optimizer the pair is two ``[S]`` columns, ``beta1`` and ``beta2``;
this mixin turns the keyword into them and back (``get_hparams``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import HyperparameterError
from .hparams import HParam, unit_interval


def beta(name: str) -> HParam:
    """``beta1``/``beta2`` with torch's defaults and torch's range ``[0, 1)``."""
    return unit_interval(name, 0.9 if name == "beta1" else 0.999, closed=False)


def expand_betas(raw: Any, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(beta1s, beta2s)`` as float64 ``[S]`` tensors from any accepted form of ``betas``."""
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
    return b[:, 0].clone(), b[:, 1].clone()


class BetasMixin:
    """Accept ``betas`` in the constructor and ``set_hparams``; give it back from ``get_hparams``."""

    def _expand(self, hparams: Mapping[str, Any], num_slots: int) -> dict[str, torch.Tensor]:
        hparams = dict(hparams)
        out = {}
        if "betas" in hparams:
            out["beta1"], out["beta2"] = expand_betas(hparams.pop("betas"), num_slots)
        out.update(super()._expand(hparams, num_slots))  # type: ignore[misc]
        return out

    def _collapse(self, row: dict[str, float]) -> dict[str, Any]:
        row = super()._collapse(row)  # type: ignore[misc]
        row["betas"] = (row.pop("beta1"), row.pop("beta2"))
        return row

    def public_hparams(self) -> list[str]:
        names = super().public_hparams()  # type: ignore[misc]
        at = names.index("beta1")
        return names[:at] + ["betas"] + [n for n in names[at:] if n not in ("beta1", "beta2")]
