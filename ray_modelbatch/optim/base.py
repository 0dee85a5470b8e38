"""The vectorized optimizer machinery shared by every optimizer of :mod:`ray_modelbatch.optim`.

Every hyperparameter is a ``[S]`` tensor, so slots can differ in anything
(learning rate, betas, weight decay, schedule, plateau rule, clipping) and the
update is still a fixed handful of elementwise kernels over each flat
``[S, P]`` buffer with per-slot coefficients broadcast as ``[S, 1]`` columns.
The kernel count of a step does not depend on S. One exception, on CPU: where
each slot has at least ``SINGLE_PASS_MIN_ELEMENTS`` parameters, Adam, AdamW and
SGD call torch's own single-pass kernel once per slot (:meth:`VectorOptimizer._apply_single_pass`),
since there one pass per slot beats ten cached passes over the stack.

Slots that must not move in a step (inactive, non-finite gradients, an fp16
overflow) are not handled with extra ``where`` passes over the parameters:
their coefficients are chosen so the update is an exact no-op (decay factor 1,
step size 0, moment weight 0) after their gradients are zeroed.

Parameter groups (:mod:`.groups`) give a subset of the parameters its own
weight decay and lr multiplier, still per slot: the coefficients that involve
them are computed once per group and become per-column values, picked from a
``[n, G + 1]`` table by a fixed number of passes (none inside a run of one
group's parameters).

Per-slot state comes in three shapes, all with the slot as dim 0 and all in
:meth:`VectorOptimizer.slot_tensors`: per-parameter buffers (``STATE``: Adam's
moments, ``[S, P]``), the step count, and per-slot scalars (``SLOT_SCALARS``,
e.g. NAdam's ``mu_product``, and the plateau state of :mod:`.plateau`, ``[S]``).
"""

from __future__ import annotations

import collections
import math
import sys
import types
import warnings
from typing import Any, Callable, ClassVar, Collection, Mapping, Sequence

import torch

try:  # torch's own tools (FlopCounterMode, op loggers) push these modes; torch.compile cannot trace under one
    from torch.utils._python_dispatch import _get_current_dispatch_mode
except ImportError:  # pragma: no cover - a torch without it: compile is tried, and its failure falls back
    def _get_current_dispatch_mode() -> Any:
        return None

from ..errors import HyperparameterError
from ..model_batch import ModelBatch, Slots
from . import gradless
from . import groups as pgroups
from . import moment_sqrt
from . import plateau as plateau_rule
from . import schedules
from . import torch_compat
from .coefficient_window import CoefficientWindow
from .hparams import HParam, nonneg, per_slot

_nonneg = nonneg  # the old private name, kept for imports of it

COMMON: dict[str, HParam] = {
    "max_grad_norm": HParam(math.inf, lambda v: v > 0, "max_grad_norm must be > 0 (inf or None disables clipping)"),
    "schedule_kind": HParam(0.0, lambda v: (v >= 0) & (v < len(schedules.KINDS)), "unknown schedule kind"),
    **schedules.COLUMNS,
    **plateau_rule.COLUMNS,
}


# On CPU an elementwise pass over a large [S, P] buffer streams it from DRAM,
# and an update takes about ten such passes. Running all passes over one
# cache-sized tile before the next keeps the tile in cache, so DRAM is read
# about once per step, like a fused kernel would. On GPUs one kernel per pass
# over the whole buffer is what is fast, so there is a single tile.
# The size is measured (Adam's step, median of 7, 2-core AMD EPYC): 1M elements (4 MiB per fp32 buffer)
# gave 17.7 ms for a 32-slot 784-256-256-10 MLP (8.6M elements) against 27.1 ms at 128k, where the ten
# ops' per-call cost over ~66 tiles dominated, and 21.1 ms untiled; 65.7 / 105.2 / 80.2 ms at 128 slots.
# It was best or within 5% of the best for every family of benchmarks/fused_step.py.
CPU_TILE_ELEMENTS = 1 << 20
# Dtypes whose CPU update may run as torch's single-pass kernel, one call per slot (see
# VectorOptimizer._apply_single_pass), and the fewest elements per slot for which that pays: a call costs
# about 30 us of its own, and saves about 1.8 ns per element against the tiled update (Adam's step,
# median of 9: 1.20 against 0.83 ms at 32 slots of 6,337 elements, 1.59 against 2.40 ms at 25,738,
# 2.85 against 5.82 ms at 61,728; 2-core AMD EPYC).
SINGLE_PASS_DTYPES = (torch.float32, torch.float64)
SINGLE_PASS_MIN_ELEMENTS = 1 << 14
# Steps between two looks at how many zeros the second moments hold, and the share of zeros from which the
# clamp of moment_sqrt pays (VectorOptimizer._refresh_root_clamp). torch's CPU sqrt of [32, 6337] fp32
# values, one thread: 27 us without zeros, 33 / 45 / 144 / 336 us with 0.44 / 1 / 3 / 10.7% zeros; the clamp and
# the root 46-62 us at any share (session 42).
ROOT_CHECK_EVERY = 32
ROOT_CLAMP_ZEROS = 0.02


# torch.optim keywords with no fused meaning, accepted at torch's own defaults (code that forwards torch's
# keyword arguments keeps working); another value is refused, naming it.
TORCH_DEFAULTS: dict[str, Any] = {"foreach": None, "maximize": False, "capturable": False,
                                  "differentiable": False, "fused": None}


def _drop_torch_defaults(name: str, hparams: dict[str, Any]) -> None:
    for key, default in TORCH_DEFAULTS.items():
        if key in hparams:
            value = hparams.pop(key)
            if value != default and not (key in ("foreach", "fused") and value is False):
                raise HyperparameterError(
                    f"{name}({key}={value!r}) is not supported: a fused optimizer always updates every slot in "
                    f"one pass{' and minimizes' if key == 'maximize' else ''}; drop {key}= (torch's default "
                    f"{default!r} is accepted).")


def _compile(fn: Callable) -> Callable:
    import torch._dynamo  # noqa: F401 - fail here, not at the first step, if torch has no compiler stack

    # dynamic=None: the first change of shape recompiles once with symbolic sizes. With static
    # shapes every stack size is another entry in Dynamo's per-function cache (shared by every
    # optimizer instance), and past its limit Dynamo silently runs the function eagerly.
    return torch.compile(fn, fullgraph=True, dynamic=None)


_CORE_PER_CLASS: dict[type, Callable] = {}


def _core_of(cls: type) -> Callable:
    """``VectorOptimizer._core`` with a code object of its own for optimizer class ``cls``.

    Dynamo keeps compiled entries, and its recompile limit (8), per code
    object. With one shared ``_core`` every optimizer class (their ``hp``
    dicts differ) evicts the others, and a process that steps a few classes
    (stacks of different optimizers on one host) runs past the limit and falls
    back to eager. A copy per class keeps each class's entries apart.
    """
    fn = _CORE_PER_CLASS.get(cls)
    if fn is None:
        base = VectorOptimizer._core
        code = base.__code__.replace(co_name=f"_core_{cls.__name__}")
        fn = types.FunctionType(code, base.__globals__, code.co_name, base.__defaults__, base.__closure__)
        _CORE_PER_CLASS[cls] = fn
    return fn


def _is_compile_failure(exc: Exception) -> bool:
    """Errors of the compiler stack (Dynamo, Inductor, a missing C++ compiler), not of the math."""
    mod = type(exc).__module__
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "compile" in type(exc).__name__.lower()


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient's norm is summed in: at least fp32 (``torch.promote_types(dtype, float32)`` for
    floating dtypes, without its dispatcher call each step)."""
    return dtype if dtype == torch.float64 else torch.float32


def _tiles(t: torch.Tensor) -> list[tuple[slice, slice]]:
    """Row/column blocks of a ``[n, P]`` buffer that each fit in the CPU cache (one block on GPU)."""
    n, width = t.shape
    if t.device.type != "cpu" or n * width <= CPU_TILE_ELEMENTS:
        return [(slice(None), slice(None))]
    if width >= CPU_TILE_ELEMENTS:
        return [(slice(r, r + 1), slice(c, c + CPU_TILE_ELEMENTS)) for r in range(n) for c in range(0, width, CPU_TILE_ELEMENTS)]
    rows = CPU_TILE_ELEMENTS // width
    return [(slice(r, r + rows), slice(None)) for r in range(0, n, rows)]


class _RowColumns(Mapping[str, torch.Tensor]):
    """The hyperparameter columns of some rows of the ``[S, K]`` matrix, gathered on first read."""

    def __init__(self, matrix: torch.Tensor, names: Sequence[str], rows: torch.Tensor):
        self._matrix, self._rows, self._gathered = matrix, rows, None
        self._names = {k: j for j, k in enumerate(names)}

    def __getitem__(self, key: str) -> torch.Tensor:
        j = self._names[key]
        if self._gathered is None:
            self._gathered = self._matrix.index_select(0, self._rows)
        return self._gathered[:, j]

    def __iter__(self) -> Any:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class _RowsOf(Mapping[str, torch.Tensor]):
    """Some rows of every host-side hyperparameter column, each gathered when first read (the rules that
    involve several hyperparameters read two or three of the dozens of columns)."""

    def __init__(self, columns: Mapping[str, torch.Tensor], rows: torch.Tensor):
        self._columns, self._rows = columns, rows

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._columns[key][self._rows]

    def __iter__(self) -> Any:
        return iter(self._columns)

    def __len__(self) -> int:
        return len(self._columns)


class VectorOptimizer:
    """Base class: per-slot hyperparameters, masking, clipping, non-finite isolation and slot state.

    Subclasses declare ``HPARAMS`` and ``STATE`` (names of per-parameter state
    buffers) and implement :meth:`_coefficients` and :meth:`_update`. Optional:

    * ``STATE_INIT``: state buffers that start at a hyperparameter's value
      instead of 0 (Adagrad's ``sum`` starts at ``initial_accumulator_value``),
      on construction, on reset and for new slots.
    * ``SLOT_SCALARS``: per-slot scalar state and its initial value (NAdam's
      ``mu_product``). ``_coefficients`` reads the current values from ``hp``
      and returns the new ones under the key ``"scalars"``; skipped slots must
      get their old value back.

    Every optimizer also takes ``schedule=`` (:mod:`ray_modelbatch.optim.schedules`),
    ``plateau=`` (:func:`ray_modelbatch.optim.schedules.plateau`, driven by
    :meth:`plateau_step`), ``max_grad_norm=`` (per-slot clipping),
    ``param_groups=`` (see below), ``skip_nonfinite`` and ``compile``.

    ``param_groups=[{"params": names or predicate, "weight_decay": ..., "lr_scale": ...}, ...]``
    gives subsets of the parameters their own weight decay and a multiplier
    of the slot's learning rate (schedules and plateau rules apply to it), as
    torch's param groups do; each value is a float or one per slot.
    ``params`` is a list of parameter names or a predicate ``(name, param) ->
    bool`` (``lambda n, p: p.ndim < 2``: biases and norm weights). Parameters in
    no group use the optimizer's own values; a parameter in two groups is an
    error. A group that leaves a key out uses the slot's main value for it.
    Membership is the same in every slot and fixed once given; ``set_hparams``
    changes the values (``set_hparams(slot, param_groups=[...])`` with the same
    groups), ``get_hparams`` returns them with the groups' parameter names.

    torch's ``lr_scheduler`` objects are refused in one line naming the
    per-slot schedule to use instead (:mod:`.torch_compat`).
    """

    HPARAMS: ClassVar[dict[str, HParam]] = {}
    # The coefficients of _coefficients proportional to the learning rate: with parameter groups that set
    # lr_scale, these (and the decay coefficients of decay.py) are computed per group and picked per column.
    LR_COEFFICIENTS: ClassVar[tuple[str, ...]] = ()
    STATE: ClassVar[tuple[str, ...]] = ()
    STATE_INIT: ClassVar[dict[str, str]] = {}
    ROOT_STATE: ClassVar[str | None] = None  # the buffer whose root the update takes (see moment_sqrt)
    SLOT_SCALARS: ClassVar[dict[str, float]] = {}

    def __init__(
        self,
        mb: ModelBatch,
        *,
        schedule: schedules.Schedule | Sequence[schedules.Schedule] | None = None,
        plateau: plateau_rule.Plateau | Sequence[plateau_rule.Plateau | None] | None = None,
        max_grad_norm: Any = None,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        skip_nonfinite: bool = True,
        compile: bool = False,
        **hparams: Any,
    ):
        _drop_torch_defaults(type(self).__name__, hparams)
        self.mb = mb
        self.skip_nonfinite = skip_nonfinite
        # torch.compile turns the step (norms, per-slot coefficients, masks) into one call and the
        # elementwise update into one pass over parameters, gradients and state (eager runs ~10
        # passes); see _core. Off by default: compiling takes seconds per shape.
        self._compiled: Callable | None = (_compile(types.MethodType(_core_of(type(self)), self))
                                           if compile else None)
        self.specs = {**self.HPARAMS, **COMMON}
        # The per-slot arithmetic of the next steps, computed ahead (not for per-slot scalars that evolve with
        # the state, such as NAdam's mu_product: those are computed every step).
        self._window = None if self.SLOT_SCALARS else CoefficientWindow()
        s = mb.num_slots
        self._hp = {k: torch.full((s,), spec.default, dtype=torch.float64) for k, spec in self.specs.items()}
        self._layout = pgroups.NO_GROUPS
        self._group_index: dict[torch.dtype, pgroups.ColumnGroups] = {}
        values = self._expand(hparams, s)
        values["max_grad_norm"] = per_slot("max_grad_norm", max_grad_norm, s)
        values.update(schedules.encode(schedule, s))
        values.update(plateau_rule.encode(plateau, s))
        values.update(self._group_values(param_groups, s))
        # Groups given here belong to the optimizer's family (e.g. a functools.partial in Tune): a trial
        # whose hparams name no groups keeps them (see fits_param_groups).
        self._layout_fixed = bool(self._layout)
        self._validate(values, torch.arange(s))
        self._hp.update(values)
        # New slots created by resize() start from the constructor's scalar values.
        self.defaults = {k: float(v[0]) if bool((v == v[0]).all()) else self.specs[k].default for k, v in self._hp.items()}
        self.steps = torch.zeros(s, dtype=torch.float64, device=mb.device)
        self._scalar_init = {**plateau_rule.STATE_INIT, **self.SLOT_SCALARS}
        self.scalars = {k: torch.full((s,), v, dtype=torch.float64, device=mb.device)
                        for k, v in self._scalar_init.items()}
        self.state: dict[torch.dtype, dict[str, torch.Tensor]] = {dt: {} for dt in mb.groups}
        self.last_nonfinite = torch.zeros(s, dtype=torch.bool, device=mb.device)
        self.last_grad_norm = torch.zeros(s, dtype=torch.float32, device=mb.device)
        self._push()
        mb.attach(self)

    # ------------------------------------------------------------ torch habits
    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: PLE0237 - see torch_compat: isinstance's fallback is torch's check
        """``type(self)``, except to a ``torch.optim.lr_scheduler`` constructor: refused in one line."""
        torch_compat.refuse_scheduler(sys._getframe(1), self)
        return type(self)

    @property
    def param_groups(self) -> Any:
        """Refused: hyperparameters are per slot (``get_hparams``/``set_hparams``); see :mod:`.torch_compat`."""
        torch_compat.refuse_scheduler(sys._getframe(1), self)
        raise torch_compat.NoParamGroupsError(torch_compat.param_groups_refusal(self))

    # ------------------------------------------------------- hyperparameters
    def _expand(self, hparams: Mapping[str, Any], num_slots: int) -> dict[str, torch.Tensor]:
        """Turn user-facing keyword values into per-slot tensors (subclasses split e.g. ``betas``)."""
        out = {}
        for name, value in hparams.items():
            if name not in self.HPARAMS:
                raise HyperparameterError(
                    f"{type(self).__name__} has no hyperparameter {name!r}; valid ones are "
                    f"{sorted(self.public_hparams())}."
                )
            out[name] = per_slot(name, value, num_slots)
        return out

    def public_hparams(self) -> list[str]:
        return [k for k in self.HPARAMS] + ["max_grad_norm", "schedule", "plateau", "param_groups"]

    def _validate(self, values: Mapping[str, torch.Tensor], slots: torch.Tensor,
                  every: Mapping[str, torch.Tensor] | None = None) -> None:
        """Check each of ``values`` against its rule, then the rules that involve several hyperparameters
        against ``every`` column of these slots (default: ``values``)."""
        bads = {name: ~self.specs[name].check(v) for name, v in values.items()}
        if bads and bool(torch.cat([b.reshape(-1) for b in bads.values()]).any()):  # one sync, not one per column
            for name, bad in bads.items():
                if bool(bad.any()):
                    raise HyperparameterError(
                        f"invalid {name} for slot(s) {slots[bad].tolist()}: {values[name][bad].tolist()}. "
                        f"{self.specs[name].rule}; fix the value in the config (or search space) of those slots."
                    )
        self._check_combination(values if every is None else every, slots)

    def _check_combination(self, values: Mapping[str, torch.Tensor], slots: torch.Tensor) -> None:
        """Hook for rules that involve several hyperparameters (e.g. nesterov needs momentum)."""

    def _state_names(self) -> tuple[str, ...]:
        """Per-parameter state buffers the current hyperparameters need (allocated lazily)."""
        return self.STATE

    def _push(self) -> None:
        """Copy the host-side hyperparameters to the device, refresh host-side flags, allocate state.

        On the device the hyperparameters are one ``[S, K]`` matrix, so a step
        over a subset of slots gathers them with one ``index_select``; ``hp``
        holds its columns by name.
        """
        names = tuple(self._hp)
        self._hp_mat = torch.stack([self._hp[k] for k in names], 1).to(self.mb.device)
        self._hp_names = names
        self.hp = {k: self._hp_mat[:, j] for j, k in enumerate(names)}
        for dt, st in self.state.items():
            for name in self._state_names():
                if name not in st:
                    st[name] = self._fresh_state(dt, name)
        kinds = {schedules.KINDS[int(k)] for k in self._hp["schedule_kind"].unique().tolist()}
        self._schedule_kinds = tuple(sorted(kinds - {"constant"}))  # a tuple: compiled code guards on it
        self._clipping = bool(torch.isfinite(self._hp["max_grad_norm"]).any())
        on_cpu = self.mb.device.type == "cpu"
        self._sqrt_allowed = [dt for dt in self.state if on_cpu and self.ROOT_STATE is not None
                              and moment_sqrt.clamp_is_exact(self._sqrt_floor(), dt)]
        self._sqrt_clamp = {dt: dt in self._sqrt_allowed for dt in self.state}
        self._root_checks = 0
        self._plateau_any = bool((self._hp["plateau_on"] == 1).any())
        self._step_scalars = tuple(self.SLOT_SCALARS) + (("plateau_lr_mult",) if self._plateau_any else ())
        per_group: set[str] = set()
        if self._layout.sets("lr_scale"):
            per_group |= {*self.LR_COEFFICIENTS, "decay"}
        if self._layout.sets("weight_decay"):
            per_group |= set(pgroups.DECAY_COEFFICIENTS)
        self._per_group_keys = tuple(sorted(per_group))  # a tuple: compiled code guards on it

    # ------------------------------------------------------- parameter groups
    def _weight_decays(self) -> list[torch.Tensor]:
        """The ``weight_decay`` column and every group's: host-side flags (is any decay on?) must see both."""
        return [self._hp["weight_decay"]] + [self._hp[c] for _, key, c in self._layout.columns()
                                              if key == "weight_decay"]

    def _group_values(self, spec: Sequence[Mapping[str, Any]] | None, num_slots: int) -> dict[str, torch.Tensor]:
        """The per-slot columns of ``param_groups=`` for ``num_slots`` slots; the first groups fix the layout.

        ``None`` leaves the groups as they are. Otherwise the groups' membership
        and keys must be this optimizer's (any, if it has none yet).
        """
        if spec is None:
            return {}
        layout, values = pgroups.resolve(spec, self.mb)
        if layout != self._layout:
            if self._layout:
                raise HyperparameterError(
                    f"param_groups {layout.describe()} differ from this optimizer's {self._layout.describe()}: "
                    "group membership is the same in every slot and fixed once given; give the same groups (other "
                    "values are fine), or build another optimizer (Tune puts such trials in another stack).")
            self._use_layout(layout)
        return {c: per_slot(c, values[k][key], num_slots) for k, key, c in layout.columns()}

    def _use_layout(self, layout: pgroups.GroupLayout) -> None:
        """Add the columns of ``layout``'s values; slots not given values keep behaving as without groups."""
        # New dicts, not updates in place: set_hparams puts the old ones back if a value is refused.
        self.specs, self._hp = dict(self.specs), dict(self._hp)
        defaults = dict(self.defaults) if hasattr(self, "defaults") else None
        for k, key, c in layout.columns():
            self.specs[c] = pgroups.GROUP_HPARAMS[key]
            if key == "weight_decay":  # the slot's own decay: unchanged behaviour until the slot sets it
                self._hp[c] = self._hp["weight_decay"].clone()
            else:
                self._hp[c] = torch.full_like(self._hp["weight_decay"], pgroups.GROUP_HPARAMS[key].default)
            if defaults is not None:  # for slots a resize adds
                defaults[c] = defaults[key] if key == "weight_decay" else pgroups.GROUP_HPARAMS[key].default
        if defaults is not None:
            self.defaults = defaults
        self._layout = layout
        self._group_index = pgroups.column_groups(layout, self.mb)

    def fits_param_groups(self, spec: Sequence[Mapping[str, Any]] | None) -> bool:
        """Whether a slot with these ``param_groups`` (a trial's hparams) can use this optimizer.

        ``None`` (the trial names no groups) fits an optimizer without groups
        or with groups given at construction; other groups fit when their
        membership and keys are this optimizer's.
        """
        if spec is None:
            return not self._layout or self._layout_fixed
        return pgroups.resolve(spec, self.mb)[0] == self._layout

    def _group_tables(self, c64: dict[str, Any], hp: Mapping[str, torch.Tensor], steps: torch.Tensor,
                      ok: torch.Tensor, lr: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pop the coefficients that differ by group from ``c64``; return them as ``[n, G + 1]`` tables.

        Column 0 is the parameters in no group; column ``k + 1`` is group k,
        whose coefficients are the optimizer's own formulas with the group's
        ``weight_decay`` and ``lr * lr_scale``: torch's per-group math, exactly.
        """
        keys = [k for k in self._per_group_keys if isinstance(c64.get(k), torch.Tensor)]
        if not keys:
            return {}
        variants = []
        for k, set_keys in enumerate(self._layout.keys):
            hp_k = dict(hp)
            if "weight_decay" in set_keys:
                hp_k["weight_decay"] = hp[pgroups.column(k, "weight_decay")]
            lr_k = lr * hp[pgroups.column(k, "lr_scale")] if "lr_scale" in set_keys else lr
            variants.append(self._coefficients(hp_k, steps, ok, lr_k))
        return {key: torch.stack([c64.pop(key)] + [v[key] for v in variants], dim=1) for key in keys}

    def set_hparams(self, slots: Slots, **hparams: Any) -> None:
        """Change hyperparameters of some slots at run time, e.g. ``opt.set_hparams(3, lr=1e-3)``.

        Accepts the constructor's keywords (``schedule``, ``plateau``,
        ``max_grad_norm`` and ``param_groups`` included); values are scalars or
        one value per selected slot. ``param_groups`` must name the groups the
        optimizer has (their values may change), or, on an optimizer without
        groups, sets them for every slot: the other slots get ``lr_scale`` 1
        and their own weight decay, so they train as before. State is kept: a
        new ``plateau`` rule continues from the slot's plateau state (best,
        counters, multiplier). A ``STATE_INIT`` hyperparameter (Adagrad's
        ``initial_accumulator_value``) refills the state of selected slots that
        have not stepped yet.
        """
        idx = self.mb._cpu_index(slots)
        hparams = dict(hparams)
        values: dict[str, torch.Tensor] = {}
        if "schedule" in hparams:
            values.update(schedules.encode(hparams.pop("schedule"), idx.numel()))
        if "plateau" in hparams:
            values.update(plateau_rule.encode(hparams.pop("plateau"), idx.numel()))
        if "max_grad_norm" in hparams:
            values["max_grad_norm"] = per_slot("max_grad_norm", hparams.pop("max_grad_norm"), idx.numel())
        group_spec = hparams.pop("param_groups", None)
        values.update(self._expand(hparams, idx.numel()))
        before = (self._layout, self._hp, self.specs, self.defaults, self._group_index)
        try:
            values.update(self._group_values(group_spec, idx.numel()))
            # Only the columns being set are copied and checked (the others were checked when they were set):
            # a slot host sets a new trial's dozen columns at every attach, on the thread that steps the stack.
            merged = dict(self._hp)
            for k, v in values.items():
                column = merged[k] = merged[k].clone()
                column[idx] = v
            self._validate({k: merged[k][idx] for k in values}, idx, every=_RowsOf(merged, idx))
        except Exception:  # a refused value leaves no half-made groups behind
            self._layout, self._hp, self.specs, self.defaults, self._group_index = before
            raise
        self._hp = merged
        self._push()
        refill = {name for name, source in self.STATE_INIT.items() if source in values}
        if refill:
            fresh = idx[self.steps.cpu()[idx] == 0]
            if fresh.numel():
                self._init_state_rows(fresh, refill)

    def get_hparams(self, i: int) -> dict[str, Any]:
        """The hyperparameters of slot ``i`` as plain Python values (keyword names of the constructor)."""
        row = {k: float(v[i]) for k, v in self._hp.items()}
        group_rows = [{"params": list(names), **{key: row.pop(pgroups.column(k, key)) for key in keys}}
                      for k, (names, keys) in enumerate(zip(self._layout.members, self._layout.keys))]
        sched = schedules.decode({k: row.pop(k) for k in ("schedule_kind", *schedules.PARAM_DEFAULTS)})
        rule = plateau_rule.decode({k: row.pop(k) for k in plateau_rule.COLUMNS})
        for k, spec in self.HPARAMS.items():
            if spec.boolean:
                row[k] = bool(row[k])
        out = self._collapse(row)
        out["schedule"] = sched
        out["plateau"] = rule
        out["param_groups"] = group_rows or None  # None: no groups (set_hparams reads it as "unchanged")
        return out

    def _collapse(self, row: dict[str, float]) -> dict[str, Any]:
        """Inverse of :meth:`_expand` for one slot (subclasses rebuild e.g. ``betas``)."""
        return row

    def current_lr(self) -> torch.Tensor:
        """The learning rate each slot uses at its next step (schedule and plateau applied), ``[S]``."""
        return self._lr({**self.hp, **self.scalars}, self.steps)

    def _lr(self, hp: Mapping[str, torch.Tensor], steps: torch.Tensor) -> torch.Tensor:
        lr = hp["lr"]
        if self._schedule_kinds:
            sched = {k: hp[k] for k in schedules.PARAM_DEFAULTS}
            lr = lr * schedules.factor(hp["schedule_kind"], steps, sched, self._schedule_kinds)
        if self._plateau_any:
            lr = lr * torch.where(hp["plateau_on"] > 0, hp["plateau_lr_mult"], 1.0)
        return lr

    # --------------------------------------------------------------- plateau
    @torch.no_grad()
    def plateau_step(self, slots: Slots, values: torch.Tensor | Sequence[float]) -> None:
        """Feed each slot's metric to its plateau rule: torch's ``ReduceLROnPlateau.step(metric)`` per slot.

        Call it once per report (once per "epoch" in torch's terms) with the
        reporting slots and their metric, in the same order::

            opt.plateau_step([0, 3], torch.tensor([val_loss_0, val_loss_3]))

        ``values`` is a list of floats or a tensor on any device (no host sync
        on an accelerator). Slots without a plateau rule ignore their value;
        a NaN or infinite value counts as a bad epoch. The new multiplier
        applies from the slot's next :meth:`step` on; read it back with
        :meth:`current_lr`. A slot may appear at most once per call.
        """
        idx = self.mb._cpu_index(slots)
        n = idx.numel()
        if len(set(idx.tolist())) != n:
            raise ValueError(f"plateau_step got a slot more than once ({idx.tolist()}); pass each reporting "
                             "slot once, with its own metric.")
        metric = torch.as_tensor(values, dtype=torch.float64).to(self.mb.device).flatten()
        if metric.numel() != n:
            raise ValueError(f"plateau_step got {metric.numel()} metric values for {n} slots; pass one value per "
                             "slot, in the order of slots.")
        if n == 0 or not self._plateau_any:
            return
        dev = idx.to(self.mb.device)
        rows = self._hp_mat.index_select(0, dev)
        col = {k: j for j, k in enumerate(self._hp_names)}
        cfg = {k: rows[:, col[k]] for k in plateau_rule.COLUMNS}
        state = {k: self.scalars[k].index_select(0, dev) for k in plateau_rule.STATE_INIT}
        new = plateau_rule.update(state, cfg, rows[:, col["lr"]], metric)
        for k, v in new.items():
            self.scalars[k].index_copy_(0, dev, v)

    # ------------------------------------------------------------------ step
    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero all gradients (the flat buffer; ``set_to_none`` is accepted for API parity)."""
        self.mb.zero_grad()

    @torch.no_grad()
    def step(self, slots: Slots = "active", skip: torch.Tensor | None = None,
             closure: Callable[[], Any] | None = None) -> Any:
        """Update the selected slots whose gradients are finite; no other slot changes.

        Args:
            closure: as in ``torch.optim``: called first (with gradients enabled)
                to recompute the loss and gradients; its value is returned.
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
        if callable(slots) and not isinstance(slots, torch.Tensor):  # step(closure), torch's positional form
            slots, closure = "active", slots
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step(slots, skip)
        return loss

    @torch.no_grad()
    def _step(self, slots: Slots, skip: torch.Tensor | None) -> None:
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
        if idx is None:
            hp = self.hp  # the matrix's column views, made once in _push (38 selects a step on a tiny stack)
        elif self._compiled is None:  # gathered when first read: with the window, few steps read any
            hp = _RowColumns(self._hp_mat, self._hp_names, idx)
        else:
            hpm = self._hp_mat.index_select(0, idx)
            hp = {k: hpm[:, j] for j, k in enumerate(self._hp_names)}
        scalars = {k: rows(self.scalars[k]) for k in self._step_scalars}
        steps = rows(self.steps)
        if skip is not None and (skip.dtype != torch.bool or skip.device != mb.device):  # (a no-op .to costs)
            skip = skip.to(device=mb.device, dtype=torch.bool)
        index = [self._group_index.get(dt) for dt in groups]
        if self._sqrt_allowed and self._compiled is None:  # (a compiled update keeps the flags it traced)
            self._refresh_root_clamp()
        with gradless.kept(groups, self.state, getattr(mb, "gradless", ())):  # as torch.optim skips them
            norm, finite, okf, new_scalars = self._run_core(ps, gs, sts, hp, scalars, steps, skip, index, idx)
            if idx is not None:
                for dt, g, p, st in zip(groups, groups.values(), ps, sts):
                    g.data.index_copy_(0, idx, p)
                    for k, v in st.items():
                        self.state[dt][k].index_copy_(0, idx, v)

        nonfinite = ~finite
        if idx is None:
            self.steps.add_(okf)
            self.last_nonfinite.copy_(nonfinite)
            self.last_grad_norm.copy_(norm)
            for k, v in new_scalars.items():
                self.scalars[k].copy_(v)
        else:
            self.steps.index_copy_(0, idx, steps + okf)
            self.last_nonfinite.zero_().index_copy_(0, idx, nonfinite)
            self.last_grad_norm.zero_().index_copy_(0, idx, norm)
            for k, v in new_scalars.items():
                self.scalars[k].index_copy_(0, idx, v)
        if self._window is not None:
            self._window.stepped(self.steps)

    def _core(self, ps: list[torch.Tensor], gs: list[torch.Tensor], sts: list[dict[str, torch.Tensor]],
              hp: dict[str, torch.Tensor], scalars: dict[str, torch.Tensor], steps: torch.Tensor,
              skip: torch.Tensor | None, index: list[pgroups.ColumnGroups | None], rows: torch.Tensor | None,
              fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Norms, per-slot coefficients and the in-place update of the given rows.

        ``index`` holds each buffer's :class:`~.groups.ColumnGroups` (None
        without parameter groups). Returns ``(norm, finite, ok, new
        per-slot scalars)``. One function from the gradients to the new parameters, so
        that with ``compile=True`` the few dozen small per-slot ops
        (coefficients, clipping, masks) and the update are one compiled call.
        """
        # One fp32 norm pass per group gives both the clipping norm and the
        # finiteness test: a row's norm is NaN/inf iff it holds a NaN/inf (or
        # overflows fp32, which no trainable model survives either).
        # (at least fp32: fp16/bf16 gradients are summed in fp32, fp64 ones in fp64)
        norms = [torch.linalg.vector_norm(g, dim=1, dtype=_norm_dtype(g.dtype)) for g in gs]
        if len({n.dtype for n in norms}) > 1:
            norms = [n.double() for n in norms]
        norm = norms[0] if len(norms) == 1 else torch.stack(norms).square().sum(0).sqrt()
        finite = norm < math.inf  # a norm is not negative, and NaN compares False: one op (isfinite takes five)
        ok = finite if self.skip_nonfinite else torch.ones_like(finite)
        if skip is not None:
            ok = ok & ~skip
        okf = ok.to(torch.float64)
        hp = {**hp, **scalars} if fused else collections.ChainMap(scalars, hp)  # (read lazily when eager)
        # On CPU, whether any slot is skipped is known for free: without one (and without clipping) zeroing
        # and scaling the gradients would rewrite them unchanged (x * 1.0 == x), so the eager update skips both.
        # (Not in the compiled pass, fused=True: there the masking is a select inside the fused loop.)
        mask = fused or not ps or ps[0].device.type != "cpu" or not bool(ok.all())
        # Gradient scale per slot: 0 for skipped slots (after their NaNs are zeroed), the clipping factor where
        # clipping is on, else 1.
        scale = okf
        if self._clipping:
            clip = torch.clamp(hp["max_grad_norm"] / (norm.double() + 1e-6), max=1.0)
            scale = torch.where(ok, clip, 0.0)
        # The scale rides with the coefficients (their last column) only where the update reads it: with
        # clipping, or in the compiled pass; eagerly, kept rows are left as they are and skipped ones zeroed.
        with_scale = fused or self._clipping
        if not fused and self._window is not None:  # the per-slot arithmetic, looked up (see coefficient_window)
            values, lr, names, flags, table, table_names = self._window.lookup(
                self._hp_mat, self.hp, self.steps, {k: self.scalars[k] for k in self._step_scalars}, rows, steps,
                ok, mask if ok.device.type == "cpu" else None, self._derive)
            stacked = torch.cat([values, scale.view(1, -1, 1)]) if with_scale else values  # [K, n, 1]
            new_scalars: dict[str, torch.Tensor] = {}
        else:
            lr, c64, tables = self._derive(hp, steps, okf)
            new_scalars = c64.pop("scalars", {})
            names = [k for k, v in c64.items() if isinstance(v, torch.Tensor)]
            stacked = torch.stack([c64[k] for k in names] + ([scale] if with_scale else [])).unsqueeze(-1)
            flags = {k: v for k, v in c64.items() if not isinstance(v, torch.Tensor)}
            table_names = list(tables)
            table = torch.stack([tables[k] for k in table_names]) if tables else None  # [Kg, n, G + 1]
        single_pass = [not fused and table is None and p.device.type == "cpu" and p.dtype in SINGLE_PASS_DTYPES
                       and p.shape[1] >= SINGLE_PASS_MIN_ELEMENTS for p in ps]
        single = self._single_pass(hp, steps, ok, lr.reshape(-1)) if any(single_pass) else None
        skipped = ~ok.unsqueeze(1) if mask else None  # [n, 1]; None: no row is skipped
        for p, g, st, at, one_pass in zip(ps, gs, sts, index, single_pass):
            if one_pass and single is not None:
                self._apply_single_pass(p, g, st, single, skipped, scale)
                continue
            cols = stacked.to(p.dtype)  # one cast for all coefficients: [K, n, 1]
            by_group = table.to(p.dtype) if table is not None else None
            if fused:  # one compiled pass needs no cache tiles
                c = {k: cols[j] for j, k in enumerate(names)}
                if by_group is not None:  # each column its group's value: [n, P]
                    c.update(zip(table_names, at.select(by_group).unbind(0)))
                c.update(flags)
                self._apply(p, g, st, c, skipped, cols[-1], fused=True)
                continue
            tiles = _tiles(p)
            if len(tiles) == 1 and by_group is None:  # the whole buffer: no views to make (a dozen ops a step)
                columns = cols.unbind(0)
                c = dict(zip(names, columns))
                c.update(flags)
                self._apply(p, g, st, c, skipped, columns[-1] if with_scale else None, mask=mask)
                continue
            for r, c_ in tiles:
                c = {k: cols[j, r] for j, k in enumerate(names)}
                if by_group is not None:
                    picked = at.pick(by_group[:, r], c_, gather=p.device.type != "cpu")
                    c.update(zip(table_names, picked.unbind(0)))
                c.update(flags)
                self._apply(p[r, c_], g[r, c_], {k: v[r, c_] for k, v in st.items()}, c,
                            None if skipped is None else skipped[r], cols[-1, r] if with_scale else None,
                            mask=mask)
        return norm, finite, okf, new_scalars

    def _derive(self, hp: Mapping[str, torch.Tensor], steps: torch.Tensor, okf: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, Any], dict[str, torch.Tensor]]:
        """Every per-slot quantity of a step: the learning rate, the coefficients (new ``SLOT_SCALARS`` under
        ``"scalars"``) and the parameter groups' tables. Elementwise, so it also runs on ``[S, N]`` grids of
        step counts (:class:`~.coefficient_window.CoefficientWindow`)."""
        lr = self._lr(hp, steps)
        c64 = self._coefficients(hp, steps, okf, lr)
        tables = self._group_tables(c64, hp, steps, okf, lr) if self._layout else {}
        return lr, c64, tables

    def _apply(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], c: dict[str, Any],
               skipped: torch.Tensor | None, scale: torch.Tensor | None, fused: bool = False,
               mask: bool = True) -> None:
        """Zero skipped slots' gradients, scale (clip) them, then :meth:`_update`. (``scale`` is None where
        neither clipping nor the compiled pass reads it.)

        Eagerly the gradient buffer is scaled in place (no temporary); in a
        compiled pass the scaled gradient stays a value inside the fused loop,
        since writing it back would add a full pass of stores.
        """
        if fused:
            g = torch.where(skipped, 0.0, g) * scale
        else:
            if mask and g.device.type == "cpu":  # zero only the skipped rows (a broadcast masked_fill_ reads all)
                g.index_fill_(0, skipped.view(-1).nonzero().view(-1), 0.0)
            elif mask:  # (mask is False only on CPU, where no skipped slot is known without a sync)
                g.masked_fill_(skipped, 0.0)  # 0 * inf would be NaN
            if self._clipping:  # otherwise scale is 1 for kept slots and 0 for the zeroed ones: nothing to do
                g.mul_(scale)
        self._update(p, g, state, c)

    def _sqrt_floor(self) -> torch.Tensor | None:
        """Each slot's smallest ``eps * d``, where its update divides by ``sqrt(second moment) / d + eps``
        (see :mod:`.moment_sqrt`); None where the update takes no such root. Here ``d`` = 1: ``eps`` is added
        to the root itself (NAdam, RAdam, Adagrad); Adam and RMSprop say otherwise."""
        return self._hp["eps"] if self.ROOT_STATE is not None else None

    def _refresh_root_clamp(self) -> None:
        """Clamp the root only while at least ``ROOT_CLAMP_ZEROS`` of the second moments are zeros.

        torch's sqrt slows down from a few percent of zeros on; below that the
        clamp is one more pass for nothing (1.5-2.7% of a tiny MLP's fused
        step, whose dead ReLU units leave 0.4% zeros). One count of the buffer's
        nonzeros every ``ROOT_CHECK_EVERY`` steps decides, and a slot's reset
        (fresh moments are zeros) turns the clamp on at once. Either way the bits
        are torch's.
        """
        self._root_checks += 1
        if self._root_checks % ROOT_CHECK_EVERY != 1:
            return
        for dt in self._sqrt_allowed:
            moments = self.state[dt].get(self.ROOT_STATE)
            zeros = 0 if moments is None else moments.numel() - int(torch.count_nonzero(moments))
            self._sqrt_clamp[dt] = moments is not None and zeros >= ROOT_CLAMP_ZEROS * moments.numel()

    def _root(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """The root of a second moment: torch's bits, without the CPU kernel's slow path for zeros
        (:mod:`.moment_sqrt`). ``inplace`` for a temporary of the update's own."""
        clamp = self._sqrt_clamp.get(x.dtype, False)
        return moment_sqrt.sqrt_(x, clamp) if inplace else moment_sqrt.sqrt(x, clamp)

    def _single_pass(self, hp: Mapping[str, torch.Tensor], steps: torch.Tensor, ok: torch.Tensor,
                     lr: torch.Tensor) -> list[dict[str, Any] | None] | None:
        """Each slot's keywords for torch's single-pass CPU kernel of this optimizer (None for a skipped slot),
        or None where the optimizer has no such kernel (see :meth:`_apply_single_pass`)."""
        return None

    def _single_pass_update(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor],
                            slot: int, kwargs: dict[str, Any]) -> None:
        raise NotImplementedError

    def _apply_single_pass(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor],
                           per_slot: list[dict[str, Any] | None], skipped: torch.Tensor | None,
                           scale: torch.Tensor) -> None:
        """The eager update on CPU as torch's own fused kernel, one call per slot, with that slot's values.

        The tiled eager update makes about ten passes over each cache tile;
        torch's fused CPU kernel (``torch.optim.Adam(fused=True)``) reads and
        writes each parameter, gradient and state element once: Adam's whole
        step for a 32-slot 784-256-256-10 MLP took 8.1 against 17.7 ms (measured). Each call
        sees one slot's rows only, so a slot's result does not depend on the
        others, as in the tiled update. Skipped slots are not called: their
        parameters and state stay exactly as they were, and their gradients
        are zeroed as the tiled update zeroes them.
        """
        if skipped is not None and bool(skipped.any()):
            g.masked_fill_(skipped, 0.0)
        if self._clipping:
            g.mul_(scale.to(g.dtype).unsqueeze(1))
        for i, kwargs in enumerate(per_slot):
            if kwargs is not None:
                self._single_pass_update(p, g, state, i, kwargs)

    def _run_core(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        if self._compiled is None:
            return self._core(*args, False)
        if _get_current_dispatch_mode() is not None:
            # A TorchDispatchMode (a FLOP counter, an op logger, kernel_time.py) is active: torch.compile
            # refuses to trace under one, so this step runs eagerly and later ones compiled again.
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
        """Per-slot float64 ``[n]`` coefficients (or host-side flags) for :meth:`_update`.

        ``hp`` holds the hyperparameters and the ``SLOT_SCALARS`` of the rows;
        new values of the latter go under the key ``"scalars"``.
        """
        raise NotImplementedError

    def _update(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], c: dict[str, Any]) -> None:
        """In-place elementwise update of one flat group; ``c`` holds ``[n, 1]`` columns."""
        raise NotImplementedError

    # ------------------------------------------------------------ slot state
    def _fresh_state(self, dt: torch.dtype, name: str) -> torch.Tensor:
        """A new ``[S, P]`` state buffer at its initial value (0, or its ``STATE_INIT`` hyperparameter)."""
        data = self.mb.groups[dt].data
        source = self.STATE_INIT.get(name)
        if source is None:
            return torch.zeros_like(data)
        return torch.empty_like(data).copy_(self.hp[source].to(data.dtype).unsqueeze(1).expand_as(data))

    def _init_state_rows(self, rows: torch.Tensor, names: Collection[str] | None = None) -> None:
        """Put the per-parameter state of ``rows`` (a CPU index) back to its initial value."""
        dev = rows.to(self.mb.device)
        for st in self.state.values():
            for k, v in st.items():
                if names is not None and k not in names:
                    continue
                source = self.STATE_INIT.get(k)
                if source is None:
                    v.index_fill_(0, dev, 0.0)
                else:
                    fill = self.hp[source].index_select(0, dev).to(v.dtype).unsqueeze(1).expand(-1, v.shape[1])
                    v.index_copy_(0, dev, fill.contiguous())

    def state_dict(self) -> dict[str, Any]:
        """Every slot's state and hyperparameters (plain tensors), as ``torch.optim``'s ``state_dict``."""
        return {"class": type(self).__name__, "num_slots": self.mb.num_slots,
                "tensors": {k: v.detach().clone() for k, v in self.slot_tensors().items()},
                "hparams": {k: v.clone() for k, v in self._hp.items()},
                "param_groups": self._layout.plain()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned, into an optimizer of the same class over the same stack."""
        if state.get("class") != type(self).__name__ or state.get("num_slots") != self.mb.num_slots:
            raise HyperparameterError(
                f"this state_dict is of a {state.get('class')} over {state.get('num_slots')} slots; this optimizer is "
                f"a {type(self).__name__} over {self.mb.num_slots}. Load it into the optimizer it was saved from.")
        layout = pgroups.GroupLayout.from_plain(state.get("param_groups") or [])
        if layout != self._layout:
            if self._layout:
                raise HyperparameterError(
                    f"this state_dict has param_groups {layout.describe()}, this optimizer "
                    f"{self._layout.describe()}; load it into an optimizer with the same groups (or none).")
            self._use_layout(layout)
        self._hp = {k: v.clone().to(torch.float64) for k, v in state["hparams"].items()}
        self._push()  # allocates the state buffers the hyperparameters need
        mine = self.slot_tensors()
        unknown = sorted(set(state["tensors"]) - set(mine))
        if unknown:
            raise HyperparameterError(f"state_dict has state {unknown} that this optimizer does not keep")
        with torch.no_grad():
            for k, v in state["tensors"].items():
                mine[k].copy_(v)

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        """Every per-slot tensor of this optimizer (dim 0 is the slot): see :mod:`ray_modelbatch.slot_state`.

        Per-parameter state, step counts and per-slot scalars (``SLOT_SCALARS``
        and the plateau state). Hyperparameters are not among them: training
        never changes them, only :meth:`set_hparams` does.
        """
        out = {f"optim.{dt}.{k}": v for dt, st in self.state.items() for k, v in st.items()}
        out["optim.steps"] = self.steps
        out.update({f"optim.{k}": v for k, v in self.scalars.items()})
        return out

    def slot_state(self, i: int) -> dict[str, Any]:
        """Export slot ``i``: its step count, per-parameter state, per-slot scalars and hyperparameters."""
        i = self.mb._check_slot(i)
        scalars = torch.stack([v[i] for v in self.scalars.values()]).tolist()  # one sync
        return {
            "steps": int(self.steps[i]),
            "state": {str(dt): {k: v[i].detach().clone() for k, v in st.items()} for dt, st in self.state.items()},
            "scalars": dict(zip(self.scalars, scalars)),
            "hparams": self.get_hparams(i),
        }

    def load_slot_state(self, i: int, state: Mapping[str, Any], hparams: bool = True) -> None:
        """Import what :meth:`slot_state` exported into slot ``i`` (of any batch of the same model).

        Per-slot scalars missing from ``state`` (the plateau state of a
        checkpoint written before plateau rules existed) start fresh.
        """
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
        saved_scalars = dict(state.get("scalars", {}))
        unknown = sorted(set(saved_scalars) - set(self._scalar_init))
        missing = sorted(set(self.SLOT_SCALARS) - set(saved_scalars))
        if unknown or missing:
            raise HyperparameterError(
                f"optimizer state for slot {i} does not fit {type(self).__name__}: it was saved by another "
                f"optimizer (per-slot state {unknown} not used here, {missing} missing). Load a checkpoint of "
                "the same optimizer."
            )
        if hparams and "hparams" in state:
            self.set_hparams(i, **state["hparams"])
        for name in {k for got in saved.values() for k in got}:
            if name not in self._state_names():  # e.g. amsgrad state saved, amsgrad now off
                for dt, st in self.state.items():
                    st.setdefault(name, self._fresh_state(dt, name))
        row = torch.tensor([i])
        for dt, st in self.state.items():
            for k, v in st.items():
                src = saved[str(dt)].get(k)
                if src is not None:
                    v[i].copy_(src)
                else:
                    self._init_state_rows(row, {k})
        self.steps[i] = float(state["steps"])
        for k, v in self.scalars.items():
            v[i] = float(saved_scalars.get(k, self._scalar_init[k]))

    def _on_reset(self, i: int) -> None:
        self._init_state_rows(torch.tensor([i]))
        self.steps[i] = 0.0
        self._sqrt_clamp.update((dt, True) for dt in self._sqrt_allowed)  # fresh moments are zeros
        for k, v in self.scalars.items():
            v[i] = self._scalar_init[k]

    def _on_copy(self, src: int, dst: int) -> None:
        for st in self.state.values():
            for v in st.values():
                v[dst] = v[src]
        self.steps[dst] = self.steps[src]
        for v in self.scalars.values():
            v[dst] = v[src]

    def _on_resize(self, keep: list[int], capacity: int) -> None:
        src = torch.tensor(keep, dtype=torch.long)
        dev = src.to(self.mb.device)

        def remap(t: torch.Tensor, index: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
            out = torch.full((capacity, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            out[: len(keep)] = t.index_select(0, index)
            return out

        self.state = {dt: {k: remap(v, dev) for k, v in st.items()} for dt, st in self.state.items()}
        self.steps = remap(self.steps, dev)
        self.scalars = {k: remap(v, dev, self._scalar_init[k]) for k, v in self.scalars.items()}
        self.last_nonfinite = remap(self.last_nonfinite, dev)
        self.last_grad_norm = remap(self.last_grad_norm, dev)
        self._hp = {k: remap(v, src, self.defaults[k]) for k, v in self._hp.items()}
        self._push()
        if self.STATE_INIT and capacity > len(keep):
            self._init_state_rows(torch.arange(len(keep), capacity), set(self.STATE_INIT))
