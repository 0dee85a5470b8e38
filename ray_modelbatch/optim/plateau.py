"""``ReduceLROnPlateau`` for every slot at once, driven by each trial's own metric.

A plateau rule is not a function of the step count (like the schedules) but
of the metric history, so each slot carries four float64 state values, held by
the optimizer as ``[S]`` tensors that appear in ``slot_tensors()`` (run-ahead
snapshots, checkpoints and PBT copies carry them):

* ``plateau_best``: the best metric so far, times ``+1`` for ``mode="min"`` and
  ``-1`` for ``mode="max"``. In that orientation "better" is always "smaller"
  and a fresh slot starts at ``+inf`` whatever its mode, so a reset needs no
  configuration. Negation is exact, so every comparison of a finite metric is
  bit-for-bit the one torch makes (non-finite ones: see :func:`plateau`).
* ``plateau_num_bad``: torch's ``num_bad_epochs``.
* ``plateau_cooldown_left``: torch's ``cooldown_counter``.
* ``plateau_lr_mult``: the learning-rate multiplier the rule has reached (1 at
  first). It multiplies whatever the slot's schedule gives.

``min_lr`` and ``eps`` apply to the slot's ``lr`` hyperparameter times the
multiplier, which is the group ``lr`` torch's scheduler sees when no other
schedule runs: the reduction is ``new = max(old * factor, min_lr)``, kept only
if ``old - new > eps``; the multiplier becomes ``new / lr``, so ``lr * multiplier``
is torch's rate to an ulp or two. With another schedule the two multiply, and
``min_lr`` bounds ``lr * multiplier`` (the schedule's factor then scales the result).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Sequence

import torch

from ..errors import HyperparameterError
from .hparams import HParam, flag, per_slot, per_slot_choice

MODES = ("min", "max")
THRESHOLD_MODES = ("rel", "abs")


def _integer(name: str, default: float) -> HParam:
    return HParam(default, lambda v: (v >= 0) & (v == torch.floor(v)), f"plateau {name} must be an integer >= 0")


def _finite_nonneg(name: str, default: float) -> HParam:
    return HParam(default, lambda v: (v >= 0) & torch.isfinite(v), f"plateau {name} must be a finite number >= 0")


# Per-slot configuration columns (hyperparameters: set_hparams changes them, training never does).
COLUMNS: dict[str, HParam] = {
    "plateau_on": flag("plateau (on/off)"),
    "plateau_mode": HParam(0.0, lambda v: (v == 0) | (v == 1), "plateau mode must be 'min' or 'max'"),
    "plateau_factor": HParam(0.1, lambda v: (v >= 0) & (v < 1),
                             "plateau factor must be in [0, 1) (torch: 'Factor should be < 1.0')"),
    "plateau_patience": _integer("patience", 10.0),
    "plateau_threshold": _finite_nonneg("threshold", 1e-4),
    "plateau_threshold_mode": HParam(0.0, lambda v: (v == 0) | (v == 1),
                                     "plateau threshold_mode must be 'rel' or 'abs'"),
    "plateau_cooldown": _integer("cooldown", 0.0),
    "plateau_min_lr": _finite_nonneg("min_lr", 0.0),
    "plateau_eps": _finite_nonneg("eps", 1e-8),
}

# Per-slot state and the value a fresh slot starts from.
STATE_INIT: dict[str, float] = {
    "plateau_best": math.inf,
    "plateau_num_bad": 0.0,
    "plateau_cooldown_left": 0.0,
    "plateau_lr_mult": 1.0,
}


@dataclass(frozen=True)
class Plateau:
    """``ReduceLROnPlateau`` settings; each field is one value or one per slot (see :func:`plateau`)."""

    mode: Any = "min"
    factor: Any = 0.1
    patience: Any = 10
    threshold: Any = 1e-4
    threshold_mode: Any = "rel"
    cooldown: Any = 0
    min_lr: Any = 0.0
    eps: Any = 1e-8


def plateau(mode: Any = "min", factor: Any = 0.1, patience: Any = 10, threshold: Any = 1e-4,
            threshold_mode: Any = "rel", cooldown: Any = 0, min_lr: Any = 0.0, eps: Any = 1e-8) -> Plateau:
    """Reduce a slot's learning rate when its own metric stops improving (``ReduceLROnPlateau``).

    Keywords and defaults are torch's; each may be one value or one per slot.
    Pass the result as ``plateau=`` to any optimizer of :mod:`ray_modelbatch.optim`
    (or to ``set_hparams``); a sequence of one ``Plateau`` or ``None`` per slot
    gives slots different rules or none.

    The driver then calls ``opt.plateau_step(slots, values)`` once per report
    (torch's ``scheduler.step(metric)``), with each reporting slot's metric:

    >>> opt = Adam(mb, lr=1e-3, plateau=schedules.plateau(patience=3))
    >>> opt.plateau_step([0, 2], torch.tensor([0.41, 0.38]))  # val_loss of slots 0 and 2

    A NaN or infinite metric counts as a bad epoch and never becomes the best
    (torch treats NaN that way; a ``-inf`` loss would become torch's best and
    block every later improvement, so it is refused here too).
    """
    return Plateau(mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps)


def _from_plain(rule: Any) -> Any:
    if isinstance(rule, Mapping):
        return Plateau(**{f.name: rule[f.name] for f in fields(Plateau) if f.name in rule})
    return rule


def _encode_one(rule: Plateau | None, num_slots: int) -> dict[str, torch.Tensor]:
    cols = {k: torch.full((num_slots,), spec.default, dtype=torch.float64) for k, spec in COLUMNS.items()}
    if rule is None:
        return cols
    cols["plateau_on"].fill_(1.0)
    cols["plateau_mode"] = per_slot_choice("plateau mode", rule.mode, MODES, num_slots)
    cols["plateau_threshold_mode"] = per_slot_choice("plateau threshold_mode", rule.threshold_mode,
                                                     THRESHOLD_MODES, num_slots)
    for name in ("factor", "patience", "threshold", "cooldown", "min_lr", "eps"):
        cols[f"plateau_{name}"] = per_slot(f"plateau {name}", getattr(rule, name), num_slots)
    return cols


def encode(rule: Plateau | None | Sequence[Plateau | None], num_slots: int) -> dict[str, torch.Tensor]:
    """Per-slot float64 columns (:data:`COLUMNS`) for one rule (or None) or one rule-or-None per slot.

    A dict of Plateau's fields (what :func:`ray_modelbatch.checkpoint.plain` makes of one) is read as it.
    """
    rule = _from_plain(rule)
    if rule is None or isinstance(rule, Plateau):
        return _encode_one(rule, num_slots)
    rows = [_from_plain(r) for r in rule] if isinstance(rule, (list, tuple)) else None
    if rows is None or len(rows) != num_slots or not all(r is None or isinstance(r, Plateau) for r in rows):
        raise HyperparameterError(
            f"plateau must be None, one schedules.plateau(...) or a sequence of {num_slots} of them (None for "
            f"slots without one); got {type(rule).__name__}."
        )
    parts = [_encode_one(r, 1) for r in rows]
    return {k: torch.cat([p[k] for p in parts]) for k in COLUMNS}


def decode(row: dict[str, float]) -> Plateau | None:
    """One slot's rule from its column values (the inverse of :func:`encode`)."""
    if not row["plateau_on"]:
        return None
    values: dict[str, Any] = {f.name: row[f"plateau_{f.name}"] for f in fields(Plateau)}
    values["mode"] = MODES[int(values["mode"])]
    values["threshold_mode"] = THRESHOLD_MODES[int(values["threshold_mode"])]
    for name in ("patience", "cooldown"):
        values[name] = int(values[name])
    return Plateau(**values)


def update(state: dict[str, torch.Tensor], cfg: dict[str, torch.Tensor], lr: torch.Tensor,
           metric: torch.Tensor) -> dict[str, torch.Tensor]:
    """One ``ReduceLROnPlateau.step(metric)`` for every given slot (all ``[n]`` float64); returns the new state.

    Slots whose ``plateau_on`` is 0 get their state back unchanged.
    """
    sign = 1.0 - 2.0 * cfg["plateau_mode"]  # +1 for min, -1 for max
    thr = cfg["plateau_threshold"]
    current = torch.where(torch.isfinite(metric), metric * sign, math.nan)  # NaN compares False: a bad epoch
    best = state["plateau_best"]
    # min/rel: a < best * (1 - thr); max/rel: a > best * (thr + 1)  <=>  -a < -best * (1 + thr)
    limit = torch.where(cfg["plateau_threshold_mode"] > 0, best - thr, best * (1.0 - sign * thr))
    better = current < limit
    new_best = torch.where(better, current, best)
    bad = torch.where(better, 0.0, state["plateau_num_bad"] + 1.0)
    cool = state["plateau_cooldown_left"]
    in_cooldown = cool > 0
    cool = torch.where(in_cooldown, cool - 1.0, cool)
    bad = torch.where(in_cooldown, 0.0, bad)
    reduce = bad > cfg["plateau_patience"]
    mult = state["plateau_lr_mult"]
    old_lr = lr * mult
    new_lr = torch.maximum(old_lr * cfg["plateau_factor"], cfg["plateau_min_lr"])
    apply = reduce & (old_lr - new_lr > cfg["plateau_eps"]) & (lr > 0)
    new = {
        "plateau_best": new_best,
        "plateau_num_bad": torch.where(reduce, 0.0, bad),
        "plateau_cooldown_left": torch.where(reduce, cfg["plateau_cooldown"], cool),
        "plateau_lr_mult": torch.where(apply, new_lr / torch.where(lr > 0, lr, 1.0), mult),
    }
    on = cfg["plateau_on"] > 0
    return {k: torch.where(on, v, state[k]) for k, v in new.items()}
