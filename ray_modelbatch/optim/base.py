"""The vectorized optimizer machinery shared by SGD, Adam and AdamW.

Every hyperparameter is a ``[S]`` tensor, so slots can differ in anything
(learning rate, betas, weight decay, schedule, clipping) and the update is
still a fixed handful of elementwise kernels over each flat ``[S, P]`` buffer
with per-slot coefficients broadcast as ``[S, 1]`` columns. The kernel count
of a step does not depend on S.

Slots that must not move in a step (inactive, non-finite gradients, an fp16
overflow) are not handled with extra ``where`` passes over the parameters:
their coefficients are chosen so the update is an exact no-op (decay factor 1,
step size 0, moment weight 0) after their gradients are zeroed.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch

from ..errors import HyperparameterError
from ..model_batch import ModelBatch, Slots
from . import schedules


@dataclass(frozen=True)
class HParam:
    """One per-slot hyperparameter: its default and the rule it must satisfy."""

    default: float
    check: Callable[[torch.Tensor], torch.Tensor]
    rule: str


def _nonneg(name: str) -> HParam:
    return HParam(0.0, lambda v: (v >= 0) & torch.isfinite(v), f"{name} must be a finite number >= 0")


COMMON: dict[str, HParam] = {
    "max_grad_norm": HParam(math.inf, lambda v: v > 0, "max_grad_norm must be > 0 (inf or None disables clipping)"),
    "schedule_kind": HParam(0.0, lambda v: (v >= 0) & (v < len(schedules.KINDS)), "unknown schedule kind"),
    **{k: HParam(d, lambda v: torch.ones_like(v, dtype=torch.bool), "") for k, d in schedules.PARAM_DEFAULTS.items()},
}


def per_slot(name: str, value: Any, num_slots: int) -> torch.Tensor:
    """Broadcast a scalar, or check a per-slot sequence/tensor, into a float64 ``[S]`` CPU tensor."""
    if value is None and name == "max_grad_norm":
        value = math.inf
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if t.dim() == 0:
        return t.expand(num_slots).clone()
    if t.dim() == 1 and t.shape[0] == num_slots:
        return t.clone()
    raise HyperparameterError(
        f"{name} has shape {list(t.shape)} but the batch has {num_slots} slots. Give one value for all "
        f"slots or a sequence of exactly {num_slots} values."
    )


# On CPU an elementwise pass over a large [S, P] buffer streams it from DRAM,
# and an update takes about ten such passes. Running all passes over one
# cache-sized tile before the next keeps the tile in cache, so DRAM is read
# about once per step, like a fused kernel would. On GPUs one kernel per pass
# over the whole buffer is what is fast, so there is a single tile.
CPU_TILE_ELEMENTS = 1 << 17


def _compile(fn: Callable) -> Callable:
    import torch._dynamo  # noqa: F401 - fail here, not at the first step, if torch has no compiler stack

    # dynamic=None: the first change of shape recompiles once with symbolic sizes. With static
    # shapes every stack size is another entry in Dynamo's per-function cache (shared by every
    # optimizer instance), and past its limit Dynamo silently runs the function eagerly.
    return torch.compile(fn, fullgraph=True, dynamic=None)


def _is_compile_failure(exc: Exception) -> bool:
    """Errors of the compiler stack (Dynamo, Inductor, a missing C++ compiler), not of the math."""
    mod = type(exc).__module__
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "compile" in type(exc).__name__.lower()


def _tiles(t: torch.Tensor) -> list[tuple[slice, slice]]:
    """Row/column blocks of a ``[n, P]`` buffer that each fit in the CPU cache (one block on GPU)."""
    n, width = t.shape
    if t.device.type != "cpu" or n * width <= CPU_TILE_ELEMENTS:
        return [(slice(None), slice(None))]
    if width >= CPU_TILE_ELEMENTS:
        return [(slice(r, r + 1), slice(c, c + CPU_TILE_ELEMENTS)) for r in range(n) for c in range(0, width, CPU_TILE_ELEMENTS)]
    rows = CPU_TILE_ELEMENTS // width
    return [(slice(r, r + rows), slice(None)) for r in range(0, n, rows)]


class VectorOptimizer:
    """Base class: per-slot hyperparameters, masking, clipping, non-finite isolation and slot state.

    Subclasses declare ``HPARAMS`` and ``STATE`` (names of per-parameter state
    buffers) and implement :meth:`_coefficients` and :meth:`_update`.
    """

    HPARAMS: ClassVar[dict[str, HParam]] = {}
    STATE: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        mb: ModelBatch,
        *,
        schedule: schedules.Schedule | Sequence[schedules.Schedule] | None = None,
        max_grad_norm: Any = None,
        skip_nonfinite: bool = True,
        compile: bool = False,
        **hparams: Any,
    ):
        self.mb = mb
        self.skip_nonfinite = skip_nonfinite
        # torch.compile turns the step (norms, per-slot coefficients, masks) into one call and the
        # elementwise update into one pass over parameters, gradients and state (eager runs ~10
        # passes); see _core. Off by default: compiling takes seconds per shape.
        self._compiled: Callable | None = _compile(self._core) if compile else None
        self.specs = {**self.HPARAMS, **COMMON}
        s = mb.num_slots
        self._hp = {k: torch.full((s,), spec.default, dtype=torch.float64) for k, spec in self.specs.items()}
        values = self._expand(hparams, s)
        values["max_grad_norm"] = per_slot("max_grad_norm", max_grad_norm, s)
        if schedule is not None:
            values.update(self._expand_schedule(schedule, s))
        self._validate(values, torch.arange(s))
        self._hp.update(values)
        # New slots created by resize() start from the constructor's scalar values.
        self.defaults = {k: float(v[0]) if bool((v == v[0]).all()) else self.specs[k].default for k, v in self._hp.items()}
        self.steps = torch.zeros(s, dtype=torch.float64, device=mb.device)
        self.state: dict[torch.dtype, dict[str, torch.Tensor]] = {dt: {} for dt in mb.groups}
        self.last_nonfinite = torch.zeros(s, dtype=torch.bool, device=mb.device)
        self.last_grad_norm = torch.zeros(s, dtype=torch.float32, device=mb.device)
        self._push()
        mb.attach(self)

    # ------------------------------------------------------- hyperparameters
    def _expand(self, hparams: Mapping[str, Any], num_slots: int) -> dict[str, torch.Tensor]:
        """Turn user-facing keyword values into per-slot tensors (subclasses split e.g. ``betas``)."""
        out = {}
        for name, value in hparams.items():
            if name not in self.specs:
                raise HyperparameterError(
                    f"{type(self).__name__} has no hyperparameter {name!r}; valid ones are "
                    f"{sorted(self.public_hparams())}."
                )
            out[name] = per_slot(name, value, num_slots)
        return out

    def public_hparams(self) -> list[str]:
        return [k for k in self.HPARAMS] + ["max_grad_norm", "schedule"]

    @staticmethod
    def _expand_schedule(schedule: Any, num_slots: int) -> dict[str, torch.Tensor]:
        rows = [schedule] * num_slots if isinstance(schedule, schedules.Schedule) else list(schedule)
        if len(rows) != num_slots or not all(isinstance(r, schedules.Schedule) for r in rows):
            raise HyperparameterError(
                f"schedule must be one Schedule or a sequence of {num_slots} Schedules (one per slot); "
                "build them with ray_modelbatch.optim.schedules.constant/step_decay/warmup_cosine."
            )
        out = {"schedule_kind": torch.tensor([schedules.KINDS.index(r.kind) for r in rows], dtype=torch.float64)}
        for name, default in schedules.PARAM_DEFAULTS.items():
            if isinstance(schedule, schedules.Schedule):
                out[name] = per_slot(name, schedule.params.get(name, default), num_slots)
            else:
                out[name] = torch.tensor([float(r.params.get(name, default)) for r in rows], dtype=torch.float64)
            problem = schedules.validate(name, out[name])
            if problem:
                raise HyperparameterError(f"invalid schedule: {problem}, got {out[name].tolist()}.")
        return out

    def _validate(self, values: Mapping[str, torch.Tensor], slots: torch.Tensor) -> None:
        for name, v in values.items():
            spec = self.specs[name]
            bad = ~spec.check(v)
            if bool(bad.any()):
                where = slots[bad].tolist()
                raise HyperparameterError(
                    f"invalid {name} for slot(s) {where}: {v[bad].tolist()}. {spec.rule}; fix the value "
                    "in the config (or search space) of those slots."
                )
        self._check_combination(values, slots)

    def _check_combination(self, values: Mapping[str, torch.Tensor], slots: torch.Tensor) -> None:
        """Hook for rules that involve several hyperparameters (e.g. nesterov needs momentum)."""

    def _state_names(self) -> tuple[str, ...]:
        """Per-parameter state buffers the current hyperparameters need (allocated lazily)."""
        return self.STATE

    def _push(self) -> None:
        """Copy the host-side hyperparameters to the device, refresh host-side flags, allocate state."""
        self.hp = {k: v.to(self.mb.device) for k, v in self._hp.items()}
        for dt, st in self.state.items():
            for name in self._state_names():
                if name not in st:
                    st[name] = torch.zeros_like(self.mb.groups[dt].data)
        kinds = {schedules.KINDS[int(k)] for k in self._hp["schedule_kind"].unique().tolist()}
        self._schedule_kinds = tuple(sorted(kinds - {"constant"}))  # a tuple: compiled code guards on it
        self._clipping = bool(torch.isfinite(self._hp["max_grad_norm"]).any())

    def set_hparams(self, slots: Slots, **hparams: Any) -> None:
        """Change hyperparameters of some slots at run time, e.g. ``opt.set_hparams(3, lr=1e-3)``.

        Accepts the constructor's keywords (``schedule`` and ``max_grad_norm``
        included); values are scalars or one value per selected slot.
        """
        idx = self.mb._cpu_index(slots)
        hparams = dict(hparams)
        values: dict[str, torch.Tensor] = {}
        if "schedule" in hparams:
            values.update(self._expand_schedule(hparams.pop("schedule"), idx.numel()))
        if "max_grad_norm" in hparams:
            values["max_grad_norm"] = per_slot("max_grad_norm", hparams.pop("max_grad_norm"), idx.numel())
        values.update(self._expand(hparams, idx.numel()))
        merged = {k: v.clone() for k, v in self._hp.items()}
        for k, v in values.items():
            merged[k][idx] = v
        self._validate({k: merged[k][idx] for k in merged}, idx)
        self._hp = merged
        self._push()

    def get_hparams(self, i: int) -> dict[str, Any]:
        """The hyperparameters of slot ``i`` as plain Python values (keyword names of the constructor)."""
        row = {k: float(v[i]) for k, v in self._hp.items()}
        kind = schedules.KINDS[int(row.pop("schedule_kind"))]
        sched = {k: row.pop(k) for k in schedules.PARAM_DEFAULTS}
        out = self._collapse(row)
        out["schedule"] = schedules.Schedule(kind, {} if kind == "constant" else sched)
        return out

    def _collapse(self, row: dict[str, float]) -> dict[str, Any]:
        """Inverse of :meth:`_expand` for one slot (subclasses rebuild e.g. ``betas``)."""
        return row

    def current_lr(self) -> torch.Tensor:
        """The learning rate each slot uses at its next step (schedule applied), ``[S]``."""
        return self._lr(self.hp, self.steps)

    def _lr(self, hp: Mapping[str, torch.Tensor], steps: torch.Tensor) -> torch.Tensor:
        if not self._schedule_kinds:
            return hp["lr"]
        sched = {k: hp[k] for k in schedules.PARAM_DEFAULTS}
        return hp["lr"] * schedules.factor(hp["schedule_kind"], steps, sched, self._schedule_kinds)

    # ------------------------------------------------------------------ step
    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero all gradients (the flat buffer; ``set_to_none`` is accepted for API parity)."""
        self.mb.zero_grad()

    @torch.no_grad()
    def step(self, slots: Slots = "active", skip: torch.Tensor | None = None) -> None:
        """Update the selected slots whose gradients are finite; no other slot changes.

        Args:
            slots: the slots that ran this step (default: the active ones).
                Only these advance: parameters, state and step counts of all
                other slots stay exactly as they were.
            skip: optional bool tensor aligned with ``slots`` (``[n]``) marking
                slots to leave untouched this step, e.g. a non-finite loss or
                an fp16 overflow found by the loss scaler.

        After the step, ``last_nonfinite`` marks the slots skipped because of
        NaN/inf gradients and ``last_grad_norm`` holds each slot's gradient
        norm before clipping.
        """
        mb = self.mb
        mb.sync_grads()
        idx = mb.resolve_slots(slots)
        if idx is not None and idx.numel() == 0:
            return
        rows = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))
        groups = mb.groups
        ps = [rows(g.data) for g in groups.values()]
        gs = [rows(g.grad) for g in groups.values()]
        sts = [{k: rows(v) for k, v in self.state[dt].items()} for dt in groups]
        hp = {k: rows(v) for k, v in self.hp.items()}
        steps = rows(self.steps)
        if skip is not None:
            skip = skip.to(device=mb.device, dtype=torch.bool)
        norm, okf = self._run_core(ps, gs, sts, hp, steps, skip)
        if idx is not None:
            for dt, g, p, st in zip(groups, groups.values(), ps, sts):
                g.data.index_copy_(0, idx, p)
                for k, v in st.items():
                    self.state[dt][k].index_copy_(0, idx, v)

        new_steps = steps + okf
        nonfinite = ~torch.isfinite(norm)
        if idx is None:
            self.steps.copy_(new_steps)
            self.last_nonfinite.copy_(nonfinite)
            self.last_grad_norm.copy_(norm)
        else:
            self.steps.index_copy_(0, idx, new_steps)
            self.last_nonfinite.zero_().index_copy_(0, idx, nonfinite)
            self.last_grad_norm.zero_().index_copy_(0, idx, norm)

    def _core(self, ps: list[torch.Tensor], gs: list[torch.Tensor], sts: list[dict[str, torch.Tensor]],
              hp: dict[str, torch.Tensor], steps: torch.Tensor, skip: torch.Tensor | None,
              fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Norms, per-slot coefficients and the in-place update of the given rows; returns ``(norm, ok)``.

        One function from the gradients to the new parameters, so that with
        ``compile=True`` the few dozen small per-slot ops (coefficients,
        clipping, masks) and the update are one compiled call.
        """
        # One fp32 norm pass per group gives both the clipping norm and the
        # finiteness test: a row's norm is NaN/inf iff it holds a NaN/inf (or
        # overflows fp32, which no trainable model survives either).
        norms = [torch.linalg.vector_norm(g, dim=1, dtype=torch.float32) for g in gs]
        norm = norms[0] if len(norms) == 1 else torch.stack(norms).square().sum(0).sqrt()
        finite = torch.isfinite(norm)
        ok = finite if self.skip_nonfinite else torch.ones_like(finite)
        if skip is not None:
            ok = ok & ~skip
        okf = ok.to(torch.float64)
        c64 = self._coefficients(hp, steps, okf, self._lr(hp, steps))
        # Gradient scale per slot: 0 for skipped slots (after their NaNs are
        # zeroed), the clipping factor where clipping is on, else 1.
        scale = okf
        if self._clipping:
            clip = torch.clamp(hp["max_grad_norm"] / (norm.double() + 1e-6), max=1.0)
            scale = torch.where(ok, clip, 0.0)
        names = [k for k, v in c64.items() if isinstance(v, torch.Tensor)]
        stacked = torch.stack([c64[k] for k in names] + [scale])
        flags = {k: v for k, v in c64.items() if not isinstance(v, torch.Tensor)}
        skipped = ~ok.unsqueeze(1)
        for p, g, st in zip(ps, gs, sts):
            cols = stacked.to(p.dtype).unsqueeze(-1)  # one cast for all coefficients: [K, n, 1]
            if fused:  # one compiled pass needs no cache tiles
                c = {k: cols[j] for j, k in enumerate(names)}
                c.update(flags)
                self._apply(p, g, st, c, skipped, cols[-1], fused=True)
                continue
            for r, c_ in _tiles(p):
                c = {k: cols[j, r] for j, k in enumerate(names)}
                c.update(flags)
                self._apply(p[r, c_], g[r, c_], {k: v[r, c_] for k, v in st.items()}, c, skipped[r], cols[-1, r])
        return norm, okf

    def _apply(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], c: dict[str, Any],
               skipped: torch.Tensor, scale: torch.Tensor, fused: bool = False) -> None:
        """Zero skipped slots' gradients, scale (clip) them, then :meth:`_update`.

        Eagerly the gradient buffer is scaled in place (no temporary); in a
        compiled pass the scaled gradient stays a value inside the fused loop,
        since writing it back would add a full pass of stores.
        """
        if fused:
            g = torch.where(skipped, 0.0, g) * scale
        else:
            g.masked_fill_(skipped, 0.0)  # 0 * inf would be NaN
            g.mul_(scale)
        self._update(p, g, state, c)

    def _run_core(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self._compiled is None:
            return self._core(*args, False)
        try:
            return self._compiled(*args, True)
        except Exception as exc:  # noqa: BLE001 - no C++ compiler, an unsupported op: run eagerly
            if not _is_compile_failure(exc):
                raise
            warnings.warn(f"compile=True: torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
                          "running the optimizer update eagerly", RuntimeWarning, stacklevel=3)
            self._compiled = None
            return self._core(*args, False)

    def _coefficients(
        self, hp: Mapping[str, torch.Tensor], steps: torch.Tensor, ok: torch.Tensor, lr: torch.Tensor
    ) -> dict[str, Any]:
        """Per-slot float64 ``[n]`` coefficients (or host-side flags) for :meth:`_update`."""
        raise NotImplementedError

    def _update(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], c: dict[str, Any]) -> None:
        """In-place elementwise update of one flat group; ``c`` holds ``[n, 1]`` columns."""
        raise NotImplementedError

    # ------------------------------------------------------------ slot state
    def slot_tensors(self) -> dict[str, torch.Tensor]:
        """Every per-slot tensor of this optimizer (dim 0 is the slot): see :mod:`ray_modelbatch.slot_state`.

        Hyperparameters are not among them: training never changes them, only
        :meth:`set_hparams` does.
        """
        out = {f"optim.{dt}.{k}": v for dt, st in self.state.items() for k, v in st.items()}
        out["optim.steps"] = self.steps
        return out

    def slot_state(self, i: int) -> dict[str, Any]:
        """Export slot ``i``: its step count, per-parameter state and hyperparameters."""
        i = self.mb._check_slot(i)
        return {
            "steps": int(self.steps[i]),
            "state": {str(dt): {k: v[i].detach().clone() for k, v in st.items()} for dt, st in self.state.items()},
            "hparams": self.get_hparams(i),
        }

    def load_slot_state(self, i: int, state: Mapping[str, Any], hparams: bool = True) -> None:
        """Import what :meth:`slot_state` exported into slot ``i`` (of any batch of the same model)."""
        i = self.mb._check_slot(i)
        saved = state["state"]
        for dt, st in self.state.items():
            got = saved.get(str(dt))
            width = self.mb.groups[dt].numel
            if got is None or not set(got) <= set(self.STATE) or any(v.numel() != width for v in got.values()):
                raise HyperparameterError(
                    f"optimizer state for slot {i} does not fit this batch: it was saved for another model "
                    f"signature or optimizer ({type(self).__name__} expects {width} {dt} values per state "
                    f"buffer out of {list(self.STATE)}). Load a checkpoint of the same model and optimizer."
                )
        if hparams and "hparams" in state:
            self.set_hparams(i, **state["hparams"])
        for name in {k for got in saved.values() for k in got}:
            if name not in self._state_names():  # e.g. amsgrad state saved, amsgrad now off
                for dt, st in self.state.items():
                    st.setdefault(name, torch.zeros_like(self.mb.groups[dt].data))
        for dt, st in self.state.items():
            for k, v in st.items():
                src = saved[str(dt)].get(k)
                v[i].copy_(src) if src is not None else v[i].zero_()
        self.steps[i] = float(state["steps"])

    def _on_reset(self, i: int) -> None:
        for st in self.state.values():
            for v in st.values():
                v[i].zero_()
        self.steps[i] = 0.0

    def _on_copy(self, src: int, dst: int) -> None:
        for st in self.state.values():
            for v in st.values():
                v[dst] = v[src]
        self.steps[dst] = self.steps[src]

    def _on_resize(self, keep: list[int], capacity: int) -> None:
        src = torch.tensor(keep, dtype=torch.long)
        dev = src.to(self.mb.device)

        def remap(t: torch.Tensor, index: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
            out = torch.full((capacity, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            out[: len(keep)] = t.index_select(0, index)
            return out

        self.state = {dt: {k: remap(v, dev) for k, v in st.items()} for dt, st in self.state.items()}
        self.steps = remap(self.steps, dev)
        self.last_nonfinite = remap(self.last_nonfinite, dev)
        self.last_grad_norm = remap(self.last_grad_norm, dev)
        self._hp = {k: remap(v, src, self.defaults[k]) for k, v in self._hp.items()}
        self._push()
