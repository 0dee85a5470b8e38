"""Per-slot learning-rate schedules as pure functions of each slot's step count.

A schedule is a description (kind plus parameters), not an object with its own
counter: the optimizer owns each slot's step count, so a schedule's position
is checkpointed, copied (PBT) and reset together with the optimizer state.

At a slot's step ``t`` (the number of updates it has already taken) the
learning rate is ``lr * factor(t)``, exactly as ``torch.optim.lr_scheduler``
gives it when ``scheduler.step()`` follows every ``optimizer.step()``.

Every parameter may be one value or one per slot, and each slot may have its
own kind (pass a sequence of one Schedule per slot). Inside the optimizer a
schedule is a set of float64 ``[S]`` columns (:data:`PARAM_DEFAULTS`), shared
by the kinds that use a parameter of the same meaning, so that ``factor``
is a fixed handful of elementwise ops whatever the mix of kinds.

:func:`plateau` (``ReduceLROnPlateau``) is not a function of the step count;
it lives in :mod:`ray_modelbatch.optim.plateau` and is re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

import torch

from ..errors import HyperparameterError
from .hparams import HParam, flag, per_slot, per_slot_choice
from .plateau import Plateau, plateau  # re-exported: schedules.plateau(...)

__all__ = ["Schedule", "Plateau", "constant", "step_decay", "warmup_cosine", "exponential", "multi_step", "one_cycle",
           "linear", "warmup_linear", "plateau", "factor", "encode", "decode", "KINDS", "MAX_MILESTONES"]

KINDS = ("constant", "step", "warmup_cosine", "exponential", "multi_step", "one_cycle", "linear", "warmup_linear")

MAX_MILESTONES = 8
"""``multi_step`` keeps up to this many milestones per slot (padded with ``inf``, which is never reached)."""

ANNEAL = ("cos", "linear")


def _at_least(name: str, low: float, default: float) -> HParam:
    return HParam(default, lambda v: v >= low, f"schedule {name} must be >= {low:g}")


def _positive(name: str, default: float) -> HParam:
    return HParam(default, lambda v: (v > 0) & torch.isfinite(v), f"schedule {name} must be a finite number > 0")


# The per-slot columns a schedule is stored in; rows of kinds that do not use a column keep its default.
COLUMNS: dict[str, HParam] = {
    "step_size": _at_least("step_size", 1, 1.0),
    "gamma": _positive("gamma", 1.0),
    "warmup_steps": _at_least("warmup_steps", 0, 0.0),
    "total_steps": HParam(1.0, lambda v: (v >= 1) & torch.isfinite(v),
                          "schedule total_steps must be a finite number >= 1"),
    "min_lr_ratio": HParam(0.0, lambda v: (v >= 0) & (v <= 1), "schedule min_lr_ratio must be in [0, 1]"),
    **{f"milestone_{k}": _at_least("milestones", 0, math.inf) for k in range(MAX_MILESTONES)},
    "pct_start": HParam(0.3, lambda v: (v >= 0) & (v <= 1), "schedule pct_start must be in [0, 1]"),
    "div_factor": _positive("div_factor", 25.0),
    "final_div_factor": _positive("final_div_factor", 1e4),
    "anneal_linear": flag("schedule anneal_strategy"),
    "three_phase": flag("schedule three_phase"),
    "start_factor": HParam(1.0 / 3, lambda v: (v > 0) & (v <= 1),
                           "schedule start_factor must be in (0, 1] (as in LinearLR)"),
    "end_factor": HParam(1.0, lambda v: (v >= 0) & (v <= 1), "schedule end_factor must be in [0, 1] (as in LinearLR)"),
    "total_iters": HParam(5.0, lambda v: (v >= 0) & torch.isfinite(v),
                          "schedule total_iters must be a finite number >= 0"),
}
PARAM_DEFAULTS: dict[str, float] = {k: spec.default for k, spec in COLUMNS.items()}

# The user-facing parameters of each kind (what its builder takes and get_hparams gives back).
KIND_PARAMS: dict[str, tuple[str, ...]] = {
    "constant": (),
    "step": ("step_size", "gamma"),
    "warmup_cosine": ("total_steps", "warmup_steps", "min_lr_ratio"),
    "exponential": ("gamma",),
    "multi_step": ("milestones", "gamma"),
    "one_cycle": ("total_steps", "pct_start", "div_factor", "final_div_factor", "anneal_strategy", "three_phase"),
    "linear": ("start_factor", "end_factor", "total_iters"),
    "warmup_linear": ("warmup_steps", "total_steps"),
}


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule; each parameter is a scalar or a per-slot sequence."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; use one of {KINDS}")
        unknown = set(self.params) - set(KIND_PARAMS[self.kind])
        if unknown:
            raise ValueError(f"unknown schedule parameters {sorted(unknown)} for {self.kind!r}; "
                             f"it takes {list(KIND_PARAMS[self.kind])}")


# ------------------------------------------------------------------ builders
def constant() -> Schedule:
    """Keep the optimizer's learning rate."""
    return Schedule("constant")


def step_decay(step_size: Any, gamma: Any = 0.1) -> Schedule:
    """Multiply the learning rate by ``gamma`` every ``step_size`` steps (``torch.optim.lr_scheduler.StepLR``)."""
    return Schedule("step", {"step_size": step_size, "gamma": gamma})


def warmup_cosine(total_steps: Any, warmup_steps: Any = 0, min_lr_ratio: Any = 0.0) -> Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``.

    HuggingFace's ``get_cosine_schedule_with_warmup`` (``min_lr_ratio=0``) and
    ``get_cosine_with_min_lr_schedule_with_warmup(min_lr_rate=min_lr_ratio)``,
    so that ported scripts match: the factor at step ``t`` is
    ``t / max(1, warmup_steps)`` while ``t < warmup_steps`` (the very first
    step has rate 0), then ``r + (1 - r) * 0.5 * (1 + cos(pi * progress))``
    with ``progress = (t - warmup_steps) / max(1, total_steps - warmup_steps)``.
    With ``warmup_steps=0`` this is ``CosineAnnealingLR(T_max=total_steps,
    eta_min=min_lr_ratio * lr)``. After ``total_steps`` the rate stays at the
    minimum (HF's cosine and torch's CosineAnnealingLR would rise again).

    Up to version 0.1.0 the warmup factor was ``(t + 1) / warmup_steps``, one
    step ahead of HF's. Checkpoints store the schedule's kind and parameters,
    not its formula, so older ones load unchanged and continue with this one.
    """
    _check_order("warmup_cosine(total_steps, warmup_steps, ...)", warmup_steps, total_steps,
                 "HF's get_cosine_schedule_with_warmup takes (warmup, total), this takes (total, warmup)")
    return Schedule("warmup_cosine", {"total_steps": total_steps, "warmup_steps": warmup_steps,
                                      "min_lr_ratio": min_lr_ratio})


def exponential(gamma: Any) -> Schedule:
    """Multiply the learning rate by ``gamma`` every step: ``lr * gamma**t`` (``ExponentialLR``)."""
    return Schedule("exponential", {"gamma": gamma})


def multi_step(milestones: Any, gamma: Any = 0.1) -> Schedule:
    """Multiply the learning rate by ``gamma`` at each milestone step (``MultiStepLR``).

    ``milestones`` is one list of step counts for every slot (``[30, 80]``) or
    one list per slot (``[[30, 80], [50], []]``; the lists may differ in
    length). A slot keeps at most :data:`MAX_MILESTONES` (8) milestones: they
    are padded to that count with ``inf``. A milestone listed twice applies
    ``gamma`` twice, as in torch.
    """
    return Schedule("multi_step", {"milestones": milestones, "gamma": gamma})


def one_cycle(total_steps: Any, pct_start: Any = 0.3, div_factor: Any = 25.0, final_div_factor: Any = 1e4,
              anneal_strategy: Any = "cos", three_phase: Any = False) -> Schedule:
    """The 1cycle policy (``OneCycleLR`` with ``cycle_momentum=False``); the optimizer's ``lr`` is ``max_lr``.

    The rate starts at ``lr / div_factor``, rises to ``lr`` over the first
    ``pct_start`` of ``total_steps``, then anneals (``"cos"`` or ``"linear"``)
    to ``lr / (div_factor * final_div_factor)``; ``three_phase=True`` first
    comes back down to ``lr / div_factor`` symmetrically, as in torch.

    Momentum (betas) is *not* cycled: this is a learning-rate schedule only.
    Torch raises past ``total_steps`` steps; here the rate stays at its final
    value from step ``total_steps - 1`` on. A phase of zero length (which makes
    torch divide by zero) counts as finished.
    """
    return Schedule("one_cycle", {"total_steps": total_steps, "pct_start": pct_start, "div_factor": div_factor,
                                  "final_div_factor": final_div_factor, "anneal_strategy": anneal_strategy,
                                  "three_phase": three_phase})


def linear(start_factor: Any = 1.0 / 3, end_factor: Any = 1.0, total_iters: Any = 5) -> Schedule:
    """Scale the rate linearly from ``start_factor`` to ``end_factor`` over ``total_iters`` steps (``LinearLR``)."""
    return Schedule("linear", {"start_factor": start_factor, "end_factor": end_factor, "total_iters": total_iters})


def warmup_linear(warmup_steps: Any, total_steps: Any) -> Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then linear decay to 0 at ``total_steps``.

    HuggingFace's ``get_linear_schedule_with_warmup``: the factor at step ``t``
    is ``t / max(1, warmup_steps)`` while ``t < warmup_steps`` (so the very
    first step has rate 0), then ``max(0, (total_steps - t) / max(1, total_steps - warmup_steps))``.
    """
    _check_order("warmup_linear(warmup_steps, total_steps)", warmup_steps, total_steps,
                 "the order is HF's get_linear_schedule_with_warmup's")
    return Schedule("warmup_linear", {"warmup_steps": warmup_steps, "total_steps": total_steps})


def _check_order(signature: str, warmup_steps: Any, total_steps: Any, order: str) -> None:
    """Refuse, where the builder is called, a warmup longer than its schedule (most often the two arguments
    swapped: the cosine and linear builders take them in HF's orders, which differ). Values that are not
    numbers yet (Tune search domains) are checked when the optimizer gets the schedule."""
    try:
        warmup = torch.as_tensor(warmup_steps, dtype=torch.float64)
        total = torch.as_tensor(total_steps, dtype=torch.float64)
        late = bool((warmup > total).any())
    except (TypeError, ValueError, RuntimeError):
        return
    if late:
        raise HyperparameterError(
            f"{signature} got warmup_steps={warmup_steps} > total_steps={total_steps}: the rate would drop to its end "
            f"value before the warmup is done. Were the two swapped? ({order}.) Fix: total_steps >= warmup_steps "
            "(total_steps counts the warmup); keywords make the order plain.")


# ------------------------------------------------------------------ encoding
def _milestone_columns(value: Any, num_slots: int) -> dict[str, torch.Tensor]:
    """One shared list, or one list per slot, as MAX_MILESTONES columns padded with inf."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    value = list(value)
    nested = bool(value) and all(isinstance(v, (list, tuple)) for v in value)
    if nested and len(value) != num_slots:
        raise HyperparameterError(
            f"multi_step milestones has {len(value)} lists but the batch has {num_slots} slots; give one "
            f"list for all slots or exactly {num_slots} lists (one per slot)."
        )
    rows = [list(v) for v in value] if nested else [value] * num_slots
    too_long = [i for i, r in enumerate(rows) if len(r) > MAX_MILESTONES]
    if too_long:
        raise HyperparameterError(
            f"multi_step takes at most {MAX_MILESTONES} milestones per slot; slot(s) {too_long} have more. "
            "Merge milestones, or use step_decay/exponential for regular decay."
        )
    table = torch.full((num_slots, MAX_MILESTONES), math.inf, dtype=torch.float64)
    for i, r in enumerate(rows):
        if r:
            table[i, : len(r)] = torch.tensor([float(m) for m in r], dtype=torch.float64)
    return {f"milestone_{k}": table[:, k].clone() for k in range(MAX_MILESTONES)}


def _encode_one(schedule: Schedule, num_slots: int) -> dict[str, torch.Tensor]:
    """Columns for ``num_slots`` slots; a parameter the Schedule leaves out keeps its column default."""
    cols = {k: torch.full((num_slots,), d, dtype=torch.float64) for k, d in PARAM_DEFAULTS.items()}
    cols["schedule_kind"] = torch.full((num_slots,), float(KINDS.index(schedule.kind)), dtype=torch.float64)
    for name in KIND_PARAMS[schedule.kind]:
        if name not in schedule.params:  # only a Schedule(...) built by hand; the builders pass every one
            continue
        value = schedule.params[name]
        if name == "milestones":
            cols.update(_milestone_columns(value, num_slots))
        elif name == "anneal_strategy":
            cols["anneal_linear"] = per_slot_choice("schedule anneal_strategy", value, ANNEAL, num_slots)
        else:
            cols[name] = per_slot(f"schedule {name}", value, num_slots)
    return cols


_WARMED = tuple(float(KINDS.index(k)) for k in ("warmup_cosine", "warmup_linear"))


def _check_warmup(cols: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Refuse a warmup longer than its schedule: the rate would drop to its end value mid-warmup, unsaid."""
    warmed = (cols["schedule_kind"] == _WARMED[0]) | (cols["schedule_kind"] == _WARMED[1])
    late = (warmed & (cols["warmup_steps"] > cols["total_steps"])).nonzero().flatten().tolist()
    if late:
        where = f" of slot(s) {late}" if cols["schedule_kind"].numel() > 1 else ""
        raise HyperparameterError(
            f"warmup_steps ({_values(cols['warmup_steps'], late)}) is more than total_steps "
            f"({_values(cols['total_steps'], late)}) in the schedule{where}, so the rate would drop to "
            "its end value before the warmup is done; fix: total_steps >= warmup_steps (total_steps counts the "
            "warmup).")
    return cols


def _values(column: torch.Tensor, slots: list[int]) -> str:
    """The values of ``slots`` in a column, as integers where they are."""
    vals = sorted({int(v) if float(v).is_integer() else float(v) for v in column[slots].tolist()})
    return ", ".join(str(v) for v in vals)


def _from_plain(schedule: Any) -> Any:
    if schedule is None:
        return constant()
    if isinstance(schedule, Mapping) and "kind" in schedule:
        return Schedule(schedule["kind"], dict(schedule.get("params") or {}))
    return schedule


def encode(schedule: Schedule | Sequence[Schedule] | None, num_slots: int) -> dict[str, torch.Tensor]:
    """Per-slot float64 columns (``schedule_kind`` and :data:`PARAM_DEFAULTS`) for one schedule or one per slot.

    ``None`` is :func:`constant`. A dict ``{"kind": ..., "params": {...}}`` (what
    :func:`ray_modelbatch.checkpoint.plain` makes of a Schedule) is read as that Schedule.
    """
    schedule = _from_plain(schedule)
    if isinstance(schedule, Schedule):
        return _check_warmup(_encode_one(schedule, num_slots))
    rows = [_from_plain(r) for r in schedule] if isinstance(schedule, (list, tuple)) else None
    if rows is None or len(rows) != num_slots or not all(isinstance(r, Schedule) for r in rows):
        got = type(schedule).__name__ if rows is None else f"a sequence of {len(rows)}"
        torch_cls = schedule if isinstance(schedule, type) else type(schedule)
        if torch_cls.__module__.startswith("torch.optim"):  # torch's scheduler (its class or an instance)
            from .torch_compat import EQUIVALENTS

            fix = EQUIVALENTS.get(torch_cls.__name__)
            got = (f"torch's {torch_cls.__name__}, which cannot drive a fused optimizer"
                   + (f": give {fix} instead" if fix else ""))
        each = "" if num_slots == 1 else f" or a sequence of {num_slots} (one per slot)"
        raise HyperparameterError(
            f"schedule must be one Schedule{each}, built with ray_modelbatch.optim.schedules (constant, step_decay, "
            f"warmup_cosine, exponential, multi_step, one_cycle, linear, warmup_linear); got {got}."
        )
    parts = [_encode_one(r, 1) for r in rows]
    return _check_warmup({k: torch.cat([p[k] for p in parts]) for k in parts[0]})


def decode(row: dict[str, float]) -> Schedule:
    """One slot's schedule from its column values (the inverse of :func:`encode`)."""
    kind = KINDS[int(row["schedule_kind"])]
    params: dict[str, Any] = {}
    for name in KIND_PARAMS[kind]:
        if name == "milestones":
            params[name] = [int(m) if float(m).is_integer() else m for m in
                            (row[f"milestone_{k}"] for k in range(MAX_MILESTONES)) if math.isfinite(m)]
        elif name == "anneal_strategy":
            params[name] = ANNEAL[int(row["anneal_linear"])]
        elif name == "three_phase":
            params[name] = bool(row[name])
        else:
            params[name] = row[name]
    return Schedule(kind, params)


# ------------------------------------------------------------------ factor
def _ramp(t: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Progress through the phase ``(start, end]`` in [0, 1]; a phase of zero length counts as done."""
    span = end - start
    return torch.where(span > 0, ((t - start) / span.clamp(min=1e-300)).clamp(0.0, 1.0), 1.0)


def _anneal(start: torch.Tensor | float, end: torch.Tensor | float, pct: torch.Tensor,
            linear_rows: torch.Tensor) -> torch.Tensor:
    cos = end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)
    lin = (end - start) * pct + start
    return torch.where(linear_rows, lin, cos)


def _one_cycle(t: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    total = p["total_steps"]
    initial = 1.0 / p["div_factor"]
    final = initial / p["final_div_factor"]
    lin = p["anneal_linear"] > 0
    end1 = p["pct_start"] * total - 1
    end2 = 2 * p["pct_start"] * total - 2
    last = total - 1
    up = _anneal(initial, 1.0, _ramp(t, torch.zeros_like(t), end1), lin)
    # two phases: up, then down to the final rate
    two = torch.where(t <= end1, up, _anneal(1.0, final, _ramp(t, end1, last), lin))
    # three phases: up, back down to the initial rate, then down to the final rate
    down = _anneal(1.0, initial, _ramp(t, end1, end2), lin)
    tail = _anneal(initial, final, _ramp(t, end2, last), lin)
    three = torch.where(t <= end1, up, torch.where(t <= end2, down, tail))
    return torch.where(p["three_phase"] > 0, three, two)


def factor(kind: torch.Tensor, t: torch.Tensor, p: dict[str, torch.Tensor], present: Collection[str]) -> torch.Tensor:
    """Vectorized learning-rate factor for every slot (tensors are ``[S]`` float64).

    ``present`` names the kinds in use, known on the host, so that no branch
    needs a device sync to find out; only those kinds are computed.
    """
    out = torch.ones_like(t)

    def rows(name: str) -> torch.Tensor:
        return kind == KINDS.index(name)

    if "step" in present:
        out = torch.where(rows("step"), p["gamma"] ** torch.floor(t / p["step_size"]), out)
    if "warmup_cosine" in present:
        warm = p["warmup_steps"]
        span = torch.clamp(p["total_steps"] - warm, min=1.0)
        progress = torch.clamp((t - warm) / span, 0.0, 1.0)
        r = p["min_lr_ratio"]
        cosine = r + (1.0 - r) * 0.5 * (1.0 + torch.cos(math.pi * progress))
        warmup = t / torch.clamp(warm, min=1.0)  # HF's: step 0 has rate 0
        out = torch.where(rows("warmup_cosine"), torch.where(t < warm, warmup, cosine), out)
    if "exponential" in present:
        out = torch.where(rows("exponential"), p["gamma"] ** t, out)
    if "multi_step" in present:
        milestones = torch.stack([p[f"milestone_{k}"] for k in range(MAX_MILESTONES)])
        passed = (t >= milestones).sum(0, dtype=t.dtype)
        out = torch.where(rows("multi_step"), p["gamma"] ** passed, out)
    if "one_cycle" in present:
        out = torch.where(rows("one_cycle"), _one_cycle(t, p), out)
    if "linear" in present:
        total = p["total_iters"]
        start = p["start_factor"]
        ramp = start + (p["end_factor"] - start) * torch.minimum(t, total) / torch.clamp(total, min=1.0)
        out = torch.where(rows("linear"), ramp, out)
    if "warmup_linear" in present:
        warm, total = p["warmup_steps"], p["total_steps"]
        rise = t / torch.clamp(warm, min=1.0)
        fall = torch.clamp((total - t) / torch.clamp(total - warm, min=1.0), min=0.0)
        out = torch.where(rows("warmup_linear"), torch.where(t < warm, rise, fall), out)
    return out
