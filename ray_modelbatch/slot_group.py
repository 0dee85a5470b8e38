"""SlotGroup: the one home of every slot of one fused stack, and of everything each slot owns.

A group trains the slots whose models share a signature as one
:class:`~ray_modelbatch.ModelBatch`. It owns, for all of them together:

- the stacked models, the vectorized optimizer, the optional loss scaler and
  the per-slot data streams (the per-slot components, see
  :mod:`ray_modelbatch.slot_state`);
- occupancy: which slot is free and who holds each of the others;
- each slot's iteration: the steps it ran since its last result and the
  sums its result is made of (:class:`~ray_modelbatch.slot_results.IterationMeter`);
- the run-ahead snapshots: the slot's full state at its last few iteration
  boundaries, so a driver may let a slot train ahead of what its consumer has
  taken and still export, or go back to, exactly the state that consumer knows.

Adding, removing, stepping (with the out-of-memory split), evaluating,
exporting and loading a slot are each one method here. Drivers decide only
*when*: the standalone loop and the Ray Tune slot host both call these. The
group never imports Ray.

**Exactness.** A slot's training is a function of its own state and its own
data stream: the fused kernels compute every slot's rows independently. Only
the number of rows can change how a kernel rounds: on the direct path a
gather of one slot runs a plain GEMM, which rounds differently from a batched
one, and under ``torch.vmap`` any gather may be blocked differently from the
whole stack (measured: Adam then turns the last-bit differences into
lr-sized ones). So a fused step runs over the whole stack with the
non-stepping slots masked (``FusedEngine.train_step(skip=...)``) whenever at
least ``full_step_fraction`` of the slots step or the model runs on vmap, and
a gather on the direct path never has fewer than two rows; evaluation follows
the same rule. A slot's results are then bit-identical whichever other slots
happen to step with it (for a vmapped model: at the same stack size), which
is what lets a host run slots ahead.

Evaluation is only a forward, which often rounds a gather as the whole stack
even where training does not (each output channel of a grouped convolution
is its own group's; BatchNorm in eval mode is elementwise). Each stack
measures this once per size on its own validation set (see
:meth:`SlotGroup._eval_gathers_exact`) and, where it holds, evaluates only the
slots that finished an iteration: a CNN stack of 16 slots whose slots finish
one at a time would otherwise evaluate all 16 for each of them.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from . import checkpoint, hf, inputs, padded_stacks
from .amp import SlotGradScaler
from .data import SharedStream, resolve_steps_per_report
from .dataset_streams import DatasetInputs, per_slot_streams
from .engine import FusedEngine, StepResult, check_loss_shape
from .errors import FusionError, HyperparameterError, InputShapeError, OutOfDeviceMemoryError, is_out_of_memory
from .model_batch import ModelBatch
from .padded_stacks import family_key
from .signature import module_settings, module_signature
from .slot_results import IterationMeter, iteration_result
from .slot_state import SlotSnapshots, collect_tensors
from .step_config import RecordingConfig, SlotConfigs, static_part, tensor_paths, value_dtype
from .trial_settings import build_optimizer, fits_param_groups, optimizer_id, resolve_batch_size, resolve_optimizer

MIN_CAPACITY = 4  # a new group's first size; a stack with exact gathers never runs a single row, which would
# round differently from a larger one (one that steps whole may compact down to one row: after any resize its
# slots' results are their own to float rounding, see SlotGroup.compact_if_sparse)
# Fused steps in a row with a free row before a stack that steps whole drops its free rows
# (SlotGroup.compact_if_sparse). A resize is one copy of the stack's state (2 ms for the CNN sweep's
# 16-channel stack of 9 rows, whose fused step takes 12-18 ms), so a free row costs about a resize every
# fused step; a few steps leave Tune the time to hand a freed slot to its next trial. Compaction goes down
# to the held rows, one included: a sweep's last trials of a model train alone in their stack.
COMPACT_AFTER_STEPS = 4

logger = logging.getLogger(__name__)


def stack_key(model: nn.Module) -> str:
    """A key that is equal exactly when two models can share one fused stack.

    Tensor shapes and dtypes are not enough: two configs may give equal shapes
    but different forwards (another activation, another dropout rate, a config
    dict kept on the model), and a stack runs one forward for all its slots. So
    the key also covers the module tree and each module's settings
    (:func:`~ray_modelbatch.signature.module_settings`).
    """
    structure = [(name, type(m).__qualname__) for name, m in model.named_modules()] + list(module_settings(model))
    # A transformers model's forward also reads its config at run time (problem_type, use_cache...).
    text = repr((type(model).__module__, module_signature(model), structure, hf.config_key(model)))
    return f"{type(model).__name__}-{zlib.crc32(text.encode()):08x}"


def grown_capacity(old: int, whole: bool) -> int:
    """The next size of a full group: one row more for a stack that steps ``whole``, else a quarter more.

    A model whose gathers are not exact steps its whole stack, held or not
    (see the module docstring), so every free row costs a full slot-step,
    while a resize costs one copy of the stack's state. Measured on the CNN
    sweep of ``benchmarks/tune_sweep.py``: doubling computed 17,076 slot-steps
    for 7,714 that advanced a slot; growing by a quarter (at least 4 rows) and
    compacting after 20 sparse steps still computed 1.35-1.40 slot-steps for
    each that advanced one. Such a stack now grows one row at a time (and
    drops free rows after :data:`COMPACT_AFTER_STEPS`). A stack with exact
    gathers computes only the rows that step, so it grows by a quarter (at
    least MIN_CAPACITY rows) and resizes rarely.
    """
    return old + 1 if whole else old + max(MIN_CAPACITY, old // 4)


def label_fix(output_shape: tuple, labels: torch.Tensor) -> str:
    """The fix for a loss that failed on one model's output (``[batch, *output_shape]``) and these labels.

    Points at the labels when they are what is wrong, the common case being
    class indices stored as floats for ``cross_entropy``; at the model otherwise.
    """
    classes = output_shape[-1] if output_shape else 1
    if labels.is_floating_point() and labels.dim() == 1 and classes > 1:
        return (f"Fix: return y.long() from data() (or one-hot labels of shape [N, {classes}]). The labels are "
                f"wrong, not the model: it gives {classes} scores per example, so the loss wants class indices "
                f"as integers, and data() returns {labels.dtype} labels.")
    if inputs.integer_valued(labels) and classes > 1 and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if hi >= classes or (lo < 0 and lo != -100):  # -100: cross_entropy's ignore_index
            return (f"Fix: the labels are class indices for a model with {classes} outputs per example, so they must "
                    f"lie in [0, {classes}); data() has labels from {lo} to {hi}. Remap them in data() (e.g. to "
                    f"0..{classes - 1})" + (f", or give the model {hi + 1} outputs." if hi >= classes else "."))
    if not labels.is_floating_point() and classes == 1:
        return ("Fix: give the model one output per class (e.g. nn.Linear(..., num_classes)), or use a loss for "
                "one value per example: the model gives 1 value per example and the labels are integer classes.")
    return "Fix: make the config's model output what the loss expects for these labels (e.g. one logit per class)."


def _extreme_label_rows(y: Any) -> torch.Tensor | None:
    """The rows of integer labels ``y`` holding its smallest and its largest value (None for other labels)."""
    if not isinstance(y, torch.Tensor) or y.dim() == 0 or y.shape[0] == 0 or not inputs.integer_valued(y):
        return None
    flat = y.reshape(y.shape[0], -1)
    return torch.stack([flat.amin(1).argmin(), flat.amax(1).argmax()])


@dataclass
class StepStats:
    """Which path the group's fused steps took (see the module docstring), for the host's figures."""

    full: int = 0  # whole stack, nothing masked
    masked: int = 0  # whole stack, some slots masked
    gathered: int = 0  # a gather of the stepping slots
    stepped: int = 0  # slot-steps that advanced a slot
    computed: int = 0  # slot-steps computed (masked rows included)
    compacted: int = 0  # times the stack dropped its free rows (see SlotGroup.compact_if_sparse)
    released: int = 0  # times the stack, left empty, gave back its rows (see SlotGroup.release_if_empty)
    evaluated: int = 0  # slot evaluations asked for (one per finished iteration)
    eval_rows: int = 0  # slot evaluations computed (whole-stack evaluations count every row)


class SlotGroup:
    """Slots of one model signature trained as one ModelBatch.

    Args:
        settings: the training settings, by attribute: ``optimizer`` (a
            :mod:`ray_modelbatch.optim` class, a ``ModelBatch -> optimizer``
            factory, or ``config -> class``), ``loss``, ``metrics``, ``batch_size``
            (an int or ``config -> int``), ``steps_per_report``, ``data_mode``
            (``"per_slot"`` or ``"shared"``), ``eval_batch_size``,
            ``autocast_dtype``, ``cpu_gemm``, and optionally ``train_step``,
            ``eval_step``, ``stack_by`` (a :class:`ray_modelbatch.tune.spec.SlotSpec`
            has all of them).
        key: the group's name (its :func:`stack_key`, or that key with a suffix
            when trials of one model differ in optimizer, batch size or step settings).
        config: the config of the group's first trial: it fixes the group's
            optimizer family, batch size and the step settings that must be
            equal within a stack (:meth:`accepts`).
        first: a model of the signature (its values are not used).
        data: ``(x_train, y_train, x_val, y_val)`` on ``device``.
        limit: the most slots the group may grow to.
        run_ahead: iterations a slot may complete beyond the boundary its
            consumer knows; the snapshots keep ``run_ahead + 1`` states per slot.
        full_step_fraction: step the whole stack with a mask when at least
            this share of its slots step; gather them otherwise.

    Attributes:
        max_chunk: the most slots one fused step runs at once; None means all
            of them. Set (halved) when a step runs out of device memory, and
            kept, so later steps run their slots in chunks of this size.
    """

    def __init__(self, settings: Any, key: str, first: nn.Module, data: tuple, limit: int,
                 device: torch.device | str, run_ahead: int = 0, full_step_fraction: float = 0.5,
                 config: Mapping[str, Any] | None = None):
        self.settings, self.key, self.limit = settings, key, int(limit)
        self.model_key = stack_key(first)
        self.family = family_key(first)  # models that may share this stack padded: see padded_stacks
        self._verdicts: dict[tuple, padded_stacks.Verdict] = {}  # by a narrower model's own shapes: fit()
        self.device = torch.device(device)
        if isinstance(data, DatasetInputs):  # the training set stays a dataset, streamed per slot
            self.x = self.y = None
            self.x_val, self.y_val = data.x_val, data.y_val
        else:
            self.x, self.y, self.x_val, self.y_val = data
        self.full_step_fraction = float(full_step_fraction)
        self.train_fn = getattr(settings, "train_step", None)
        self.eval_fn = getattr(settings, "eval_step", None)
        self.optimizer = resolve_optimizer(settings.optimizer, config)
        self.batch_size = resolve_batch_size(settings.batch_size, config)
        self.mb = ModelBatch([first], device=self.device, cpu_gemm=settings.cpu_gemm)
        self.mb.deactivate(0)
        self.reads: set = set()  # config paths the user's steps read (see step_config)
        self.configs: SlotConfigs | None = None
        self._validate(config or {})
        # stack_by keys split stacks by value even where only the model factory reads them (a dropout rate the
        # forward also reads as a number: see slot_dropout)
        self._pinned = {tuple(k.split(".")) if isinstance(k, str) else tuple(k)
                        for k in getattr(settings, "stack_by", ())}
        self.static = static_part(self.reads | self._pinned, config or {}, self.configs.float_paths if self.configs else ())
        self.opt = build_optimizer(self.optimizer, self.mb)
        fp16 = settings.autocast_dtype == torch.float16
        self.scaler = SlotGradScaler(self.mb) if fp16 else None
        self.engine = FusedEngine(self.mb, self.opt, None if self.train_fn else settings.loss,
                                  step_fn=self.train_fn, eval_fn=self.eval_fn, configs=self.configs,
                                  scaler=self.scaler, autocast_dtype=settings.autocast_dtype)
        if settings.data_mode == "per_slot":
            self.streams: Any = per_slot_streams(data, self.batch_size, [0], self.device,
                                                 host=bool(getattr(settings, "host_memory", False)),
                                                 num_workers=int(getattr(settings, "data_workers", 0)))
        elif self.x is None:
            raise ValueError("data_mode='shared' needs data() to return tensors; datasets are streamed per slot "
                             "(data_mode='per_slot').")
        else:
            self.streams = SharedStream(self.x, self.y, self.batch_size, seed=0)
        self.per_slot_data = bool(self.streams.per_slot)
        num = inputs.num_rows(self.x) if self.x is not None else self.streams.num_examples
        self.steps_per_report = resolve_steps_per_report(settings.steps_per_report, num, self.batch_size)
        self.owner: dict[int, str] = {}
        self.iteration: list[int] = [0]  # iterations each slot completed since it was loaded
        self.meter = IterationMeter(1, self.device)
        self.snapshots = SlotSnapshots(int(run_ahead) + 1, 1)
        self.stats = StepStats()
        self.mb.padding = self.can_pad
        self._direct: bool | None = None  # see _exact_gathers
        self._eval_exact: dict[int, bool] = {}  # by capacity, see _eval_gathers_exact
        self.max_chunk: int | None = None
        self._sparse_steps = 0  # see compact_if_sparse
        self._grow(min(self.limit, MIN_CAPACITY))

    # ------------------------------------------------------------ components
    def _python_state(self) -> list[Any]:
        return [self.streams] if self.per_slot_data else []

    def _tensors(self) -> dict[str, torch.Tensor]:
        return collect_tensors([self.mb, self.opt, self.scaler])

    @classmethod
    def around(cls, engine: FusedEngine, streams: Any, *, steps_per_report: int = 1,
               key: str = "trainer") -> "SlotGroup":
        """A group over an engine and streams that someone else built: the standalone Trainer's case.

        Every slot of the engine's ModelBatch is held (by its index) from the
        start; which of them step is the caller's choice, through
        :meth:`train_step`. The group adds what it adds for a host: the
        out-of-memory split of a fused step, the per-slot iteration sums, the
        step-path figures. Its own validation data is not used (the caller
        evaluates); no run-ahead.
        """
        g = cls.__new__(cls)
        mb = engine.mb
        g.settings, g.key, g.limit, g.device = None, key, mb.num_slots, mb.device
        g.model_key, g.train_fn, g.eval_fn, g.configs, g.reads, g.static = key, engine.step_fn, engine.eval_fn, \
            engine.configs, set(), ()
        g.family, g._verdicts = key, {}
        g.x = g.y = g.x_val = g.y_val = None
        g.steps_per_report, g.full_step_fraction = int(steps_per_report), 0.5
        g.mb, g.opt, g.scaler, g.engine = mb, engine.optimizer, engine.scaler, engine
        g.streams, g.per_slot_data = streams, bool(streams.per_slot)
        g.owner = {i: str(i) for i in range(mb.num_slots)}
        g.iteration = [0] * mb.num_slots
        g.meter = IterationMeter(mb.num_slots, mb.device)
        g.snapshots = SlotSnapshots(1, mb.num_slots)
        g.stats = StepStats()
        g._direct, g.max_chunk, g._sparse_steps, g._eval_exact = None, None, 0, {}
        return g

    @classmethod
    def build_for_profile(
        cls,
        settings: Any,
        model_factory: Callable[[], nn.Module],
        data: tuple,
        device: torch.device | str,
        hparams: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> Callable[[int], Callable[[], None]]:
        """A ``build(S)`` for :func:`ray_modelbatch.capacity.profile_capacity`.

        ``build(S)`` makes a group of S slots the way a host does (same
        ModelBatch, optimizer, engine, data streams and growth) and returns a
        function running one fused train step over all S slots on a real
        ``batch_size`` batch plus one evaluation on the validation data.
        That step has no out-of-memory fallback: profiling must see the true
        peak. ``hparams`` matter when they allocate optimizer state (SGD
        momentum, AMSGrad).
        """
        device = torch.device(device)
        hp = dict(hparams or {})

        def build(slots: int) -> Callable[[], None]:
            model = model_factory()
            group = cls(settings, stack_key(model), model, data, slots, device, config=config)
            for i in range(slots):
                group.add(f"profile-{i}", model, seed=i, hparams=hp, config=config)
            everyone = list(range(slots))

            def run() -> None:
                group._step(everyone, *group.streams.next_batch(everyone))
                group.evaluate(everyone)

            return run

        return build

    def _validate(self, config: Mapping[str, Any]) -> None:
        """Run forward and loss once on two validation rows, so a model that cannot be fused, or
        that does not fit ``data()``'s inputs or labels, fails here: at attach, for its own trial."""
        if self.train_fn is not None or self.eval_fn is not None:
            return self._validate_steps(config)
        was = self.mb.training
        self.mb.eval()
        x2, y2 = (inputs.apply(lambda t: t[:2], v) for v in (self.x_val, self.y_val))
        # Besides two validation rows, the rows holding each set's smallest and largest label: a class
        # index out of range anywhere in data() fails here, in one line, not in every trial's steps.
        probes = [("y_val[:2]", x2, y2)] + [
            (f"{name} rows {rows.tolist()}", inputs.apply(lambda t: t.index_select(0, rows), x), y.index_select(0, rows))
            for name, x, y in (("y_train", self.x, self.y), ("y_val", self.x_val, self.y_val))
            if (rows := _extreme_label_rows(y)) is not None]
        try:
            with torch.no_grad():
                try:
                    out = self.mb(x2)
                except InputShapeError as exc:
                    if getattr(exc, "about", "shape") != "shape":
                        raise  # the model's own layers, or the dtype: the data's shape is not the matter
                    raise InputShapeError(
                        f"{exc} The batches come from data(): x_val[:2] has shape {inputs.describe(x2)}; "
                        "make the config's model take inputs of that shape, or reshape the data in data()."
                    ) from None
                for where, xp, yp in probes:
                    try:
                        losses, _ = self.mb.forward_loss(xp, yp, self.settings.loss)
                    except (InputShapeError, FusionError) as exc:
                        if not isinstance(out, torch.Tensor) or not isinstance(y2, torch.Tensor):
                            raise  # an output object or dict labels: the loss's own message says more than ours
                        cause = exc.__cause__ or exc
                        raise InputShapeError(
                            f"the loss {getattr(self.settings.loss, '__name__', self.settings.loss)!r} failed on "
                            f"the model's output: {type(cause).__name__}: {cause}. One model's output has shape "
                            f"{tuple(out.shape[1:])}; the labels of data() ({where}) have shape "
                            f"{tuple(yp.shape)} and dtype {yp.dtype}{inputs.value_range(yp)}. "
                            f"{label_fix(tuple(out.shape[2:]), yp)}"
                        ) from exc
                    check_loss_shape(losses, self.settings.loss)
        finally:
            self.mb.train(was)

    def _validate_steps(self, config: Mapping[str, Any]) -> None:
        """Run the user's steps once on two validation rows: they must fuse, and the config paths they
        read decide which values are per-slot tensors and which must be equal within the stack."""
        batch = inputs.step_batch(*(inputs.apply(lambda t: t[:2], v) for v in (self.x_val, self.y_val)))
        dtype = value_dtype(next(iter(self.mb.groups), torch.float32))
        steps = self.train_fn.items() if isinstance(self.train_fn, Mapping) else [("", self.train_fn)]
        fns = [(f"train_step{f'[{p!r}]' if p else ''}", f) for p, f in steps if f is not None]
        fns += [("eval_step", self.eval_fn)] if self.eval_fn is not None else []
        was = self.mb.training
        try:
            with torch.no_grad():
                for name, fn in fns:  # first with plain values, recording what the step reads
                    self.mb.train(name.startswith("train_step"))
                    self.mb.run_step(fn, batch, RecordingConfig(config, self.reads))
                self.configs = SlotConfigs(self.capacity, tensor_paths(self.reads, [config], getattr(self.settings, "stack_by", ())),
                                           dtype, self.device)
                self.configs.set(0, config)
                shared, values = self.configs.for_rows(None)
                for name, fn in fns:  # then as a fused step runs it: float values as per-slot tensors
                    self.mb.train(name.startswith("train_step"))
                    try:
                        self.mb.run_step(fn, batch, shared, values)
                    except FusionError as exc:
                        keys = [".".join(map(str, p)) for p in self.configs.float_paths]
                        raise FusionError(
                            f"{name} reads the float config values {keys}, which inside a fused step are "
                            "per-trial tensors, so they cannot steer Python control flow (if, range, float()); "
                            "to use one that way, list it in batched_trainable(stack_by=[...]): trials then "
                            f"share a stack only with trials of the same value. {exc}"
                        ) from exc
        finally:
            self.mb.train(was)

    @property
    def can_pad(self) -> bool:
        """Whether this stack may hold narrower models padded (:mod:`.padded_stacks`): one tensor of inputs to
        check them on, one train step (not a model in parts), no transformers model, no tied tensors."""
        return (isinstance(self.x_val, torch.Tensor) and not isinstance(self.train_fn, Mapping)
                and not hasattr(self.opt, "layout") and not self.mb._hf and self.mb.per_slot_random
                and not padded_stacks.has_ties(self.mb._template))

    def fit(self, model: nn.Module, config: Mapping[str, Any] | None = None) -> padded_stacks.Verdict | None:
        """Whether ``model`` may join this stack: a verdict with its cost where it fits (at the stack's shapes,
        or narrower and padded exactly), None where it does not. Checked once per set of narrower shapes, on
        eight validation rows, with the steps that will train it (the user's own, where given)."""
        own = padded_stacks.own_shapes(self.mb.signature, module_signature(model))
        if own is None or (own and not self.can_pad):
            return None
        if not own:
            same = stack_key(model) == self.model_key
            return padded_stacks.Verdict(same, reason="" if same else "a setting its forward reads differs")
        key = tuple(sorted(own.items()))
        if key not in self._verdicts:
            x = self._check_rows()
            runs = padded_stacks.forward_runs(x)
            if self.train_fn is not None or self.eval_fn is not None:
                batch, config = inputs.step_batch(x, self.y_val[:8]), dict(config or {})
                runs = [(True, (lambda m: self.train_fn(m, batch, config)) if self.train_fn else runs[0][1]),
                        (False, (lambda m: self.eval_fn(m, batch, config)) if self.eval_fn else runs[1][1])]
            shapes = {s.name: s.shape for s in self.mb.signature}
            self._verdicts[key] = padded_stacks.check(model, shapes, self.mb._unsized, runs)
        return self._verdicts[key]

    def _check_rows(self) -> Any:
        """The validation rows a padding check (:meth:`fit`) runs on: eight."""
        return self.x_val[:8]

    def pads_cheaply(self, verdict: padded_stacks.Verdict | None) -> bool:
        """Whether a model with this :meth:`fit` verdict joins this (padded) stack: see
        :func:`padded_stacks.worth_it` (the verdict's FLOPs are for the check's rows)."""
        return padded_stacks.worth_it(verdict, inputs.num_rows(self._check_rows()), self.batch_size)

    def accepts(self, config: Mapping[str, Any]) -> bool:
        """Whether a trial with this config (and a model of the group's signature) may join the group:
        same optimizer family, same batch size, same values of what the steps read that is not per-slot,
        same parameter-group membership (``param_groups`` in its hparams)."""
        floats = self.configs.float_paths if self.configs else ()
        return (optimizer_id(resolve_optimizer(self.settings.optimizer, config)) == optimizer_id(self.optimizer)
                and resolve_batch_size(self.settings.batch_size, config) == self.batch_size
                and static_part(self.reads | self._pinned, config, floats) == self.static
                and fits_param_groups(self.opt, self.settings.hparams(config)))

    # ------------------------------------------------------------- occupancy
    @property
    def capacity(self) -> int:
        return self.mb.num_slots

    @property
    def used(self) -> int:
        return len(self.owner)

    def _grow(self, new: int) -> None:
        """Resize every per-slot component to ``new`` slots, keeping the current ones in place."""
        old = self.capacity
        if new <= old:
            return
        keep = list(range(old))
        self.mb.resize(new)  # the optimizer and the scaler follow through ModelBatch.attach
        if self.per_slot_data:
            self.streams.resize(new)
        self.meter.resize(keep, new)
        self.snapshots.resize(keep, new)
        if self.configs is not None:
            self.configs.resize(keep, new)
        self.iteration = self.iteration + [0] * (new - old)

    def compact_if_sparse(self) -> dict[int, int]:
        """Drop the free rows of a stack that steps whole while it stays sparse; returns ``{old: new}`` slots.

        A model whose gathers are not exact (convolutions, BatchNorm, vmap) runs
        its whole stack on every step, free rows included, so a stack that held
        16 trials and now holds 3 computes 16. Measured on the CNN sweep of
        ``benchmarks/tune_sweep.py``: 15,336 slot-steps computed for 8,067 that
        advanced a slot. After :data:`COMPACT_AFTER_STEPS` fused steps in a row
        with a free row, the held slots move to the first rows (in order) and
        the others are dropped, down to a stack of one row: every per-slot
        component (weights, optimizer, scaler, streams, sums, configs,
        snapshots) is resized with the same ``keep``, one copy of the stack's
        state. The caller must renumber its slots with the returned mapping.
        Like a growth, this changes the stack's row count, which (for such
        models only) may change how the kernels round: a slot's results stay
        its own to float rounding. Stacks with exact gathers never need it:
        they step only the rows that step.

        There is no floor above the held rows: at a sweep's end the last
        trials of a model train on alone, and a 4-row floor made each step of
        the CNN sweep's last trial cost 4 rows: 21.5 ms per fused step in the
        sweep for its 16-channel stack, where ``SlotGroup.step`` alone (one
        thread) takes 20.9 ms at 4 rows, 12.6 at 2 and 8.5 at 1
        (``benchmarks/RESULTS.md``, session 25).
        """
        free = self.capacity - self.used
        if self._exact_gathers() or free == 0 or self.used == 0:
            self._sparse_steps = 0
            return {}
        self._sparse_steps += 1
        if self._sparse_steps < COMPACT_AFTER_STEPS:
            return {}
        self._sparse_steps = 0
        keep = sorted(self.owner)
        self._keep_rows(keep, len(keep))
        self.stats.compacted += 1
        return {old: new for new, old in enumerate(keep)}

    def release_if_empty(self) -> bool:
        """Give back an empty stack's rows, down to one; whether it did.

        A stack grows to the most trials it held at once and, without this,
        keeps that many rows (weights, optimizer state, snapshots, streams)
        once its last trial is gone: after ASHA's first rungs the stacks of the
        models it stopped hold their peak rows for the rest of the sweep. A
        host's ``slots_per_host="auto"`` budget is for slots held, so on a GPU
        those dead rows plus the live stacks' growth could run past the
        device's memory. The stack itself stays, one free row, for the next
        trial of its shapes (it grows again as trials come).
        """
        if self.used or self.capacity == 1:
            return False
        self._sparse_steps = 0
        self._keep_rows([], 1)
        self.stats.released += 1
        return True

    def _keep_rows(self, keep: list[int], capacity: int) -> None:
        """Resize every per-slot component to ``capacity`` rows, new row ``j`` keeping old row ``keep[j]``."""
        self.mb.resize(capacity, keep)  # the optimizer and the scaler follow through ModelBatch.attach
        if self.per_slot_data:
            self.streams.resize(capacity, keep)
        self.meter.resize(keep, capacity)
        self.snapshots.resize(keep, capacity)
        if self.configs is not None:
            self.configs.resize(keep, capacity)
        self.iteration = [self.iteration[k] for k in keep] + [0] * (capacity - len(keep))
        self.owner = {new: self.owner[old] for new, old in enumerate(keep)}

    def _free_slot(self) -> int:
        for i in range(self.capacity):
            if i not in self.owner:
                return i
        if self.capacity >= self.limit:
            raise RuntimeError(f"stack {self.key} is full ({self.capacity} slots)")
        old = self.capacity
        self._grow(min(self.limit, grown_capacity(old, whole=not self._exact_gathers())))
        return old

    def add(self, owner: str, model: nn.Module, seed: int, hparams: Mapping[str, Any],
            config: Mapping[str, Any] | None = None, random_state: torch.Tensor | None = None) -> int:
        """Give ``owner`` a free slot holding ``model`` with its hyperparameters; return the slot.

        ``config`` is what the user's steps see for this slot (its trial's config).
        ``random_state`` is where the slot's dropout generator starts: the global
        generator's state right after ``model`` was built under ``seed``
        (:func:`~ray_modelbatch.slot_random.global_state`), so the slot draws the masks
        the model alone draws; default ``torch.manual_seed(seed)``'s state.
        """
        if module_signature(model) != self.mb.signature:  # narrower: only where padding is exact
            verdict = self.fit(model, config)
            if verdict is None or not verdict.ok:
                raise FusionError(f"a {type(model).__name__} of other shapes cannot join stack {self.key}"
                                  + (f": {verdict.reason}" if verdict is not None else "") + ". Fix: give it a "
                                  "stack of its own shapes (a slot host does this by itself).")
        slot = self._free_slot()
        self.mb.reset_slot(slot, model)  # the optimizer and scaler reset the slot's state with it
        if random_state is not None:
            self.mb.random.set_state(slot, random_state)
        else:
            self.mb.random.seed(slot, seed)
        self._set_hparams(slot, hparams, owner)
        if self.configs is not None:
            self.configs.set(slot, config or {})
        if self.per_slot_data:
            self.streams.reset_slot(slot, seed)
        self.owner[slot] = owner
        self._begin(slot)
        self.mb.activate(slot)
        return slot

    def _set_hparams(self, slot: int, hparams: Mapping[str, Any], owner: str | None) -> None:
        """The optimizer's ``set_hparams`` for one slot, whose error names the slot's trial, not only its row."""
        try:
            self.opt.set_hparams(slot, **hparams)
        except HyperparameterError as exc:
            if owner is None:
                raise
            raise type(exc)(f"trial {owner}: {exc}") from None

    def remove(self, slot: int) -> None:
        """Free a slot at once: masked out of every later step."""
        self.mb.deactivate(slot)
        self.owner.pop(slot, None)
        if self.configs is not None:
            self.configs.set(slot, None)
        self.meter.reset(slot)
        self.snapshots.forget(slot)

    def _begin(self, slot: int) -> None:
        """The slot's current state is its iteration-0 boundary."""
        self.iteration[slot] = 0
        self.meter.reset(slot)
        self.snapshots.capture(self._tensors(), self._python_state(), [slot], [0])

    # ------------------------------------------------------------------ work
    def step(self, slots: Sequence[int]) -> list[int]:
        """One fused step that advances exactly ``slots``; returns those that completed an iteration.

        The whole stack runs, with the others masked, when at least
        ``full_step_fraction`` of it steps; otherwise the slots are gathered
        (at least two rows). Either way each slot's result is the same.
        """
        slots = sorted(int(s) for s in slots)
        if not slots:
            return []
        cap = self.capacity
        if len(slots) == cap:
            run, skip = slots, None
            self.stats.full += 1
        elif len(slots) >= self.full_step_fraction * cap or not self._exact_gathers():
            run = list(range(cap))
            stepping = set(slots)
            skip = [i not in stepping for i in run]
            self.stats.masked += 1
        else:
            run, skip = slots, None
            if len(slots) == 1 and cap > 1:  # a one-row gather would round differently
                run = sorted(slots + [next(i for i in range(cap) if i != slots[0])])
                skip = [i not in slots for i in run]
            self.stats.gathered += 1
        res = self.train_step(run, skip)
        self.stats.stepped += len(slots)
        self.stats.computed += len(run)
        self.meter.add(res, slots)
        k = self.steps_per_report
        return [s for s in slots if self.meter.steps[s] >= k]

    def forward_path(self) -> str:
        """How this stack's training forward runs: ``"direct"``, or ``"vmap: "`` and why (on a CPU vmap is
        often little faster than a loop of the models; :meth:`ModelBatch.why_vmap` names the layer in the way)."""
        if self.train_fn is not None:
            return "vmap: the trainable's own train_step runs under torch.vmap"
        was = self.mb.training
        why = self.mb.train(True).why_vmap()
        self.mb.train(was)
        return "direct" if why is None else f"vmap: {why}"

    def _exact_gathers(self) -> bool:
        """Whether a gather of two or more slots rounds like the whole stack (``ModelBatch.gather_exact``)."""
        if self._direct is None and (self.train_fn is not None or self.eval_fn is not None):
            self._direct = False  # the user's steps run on vmap
        if self._direct is None:
            was = self.mb.training
            self._direct = self.mb.train(True).gather_exact and self.mb.train(False).gather_exact
            self.mb.train(was)
        return self._direct

    def _step(self, slots: list[int], xb: torch.Tensor, yb: torch.Tensor,
              skip: torch.Tensor | None = None) -> StepResult:
        return self.engine.train_step(xb, yb, slots=slots, per_slot=self.per_slot_data, skip=skip)

    def train_step(self, slots: list[int], skip: Sequence[bool] | None = None) -> StepResult:
        """One step for each of ``slots`` (``skip`` marks rows that compute but do not move); results
        are aligned with ``slots``.

        When the fused step runs out of device memory, the same slots run again
        as consecutive chunks of half the size (down to one slot), on the same
        batches: the streams advanced once, and the engine left every slot as it
        was. Each slot's math is independent of the others', so a chunked step
        gives each slot the result the full step would have (models with dropout
        draw other random numbers).
        """
        if self.per_slot_data:
            xb, yb = self.streams.next_batch(slots, skip)  # once: a retry must reuse these rows
        else:
            xb, yb = self.streams.next_batch(slots)
        mask = None if skip is None else torch.tensor(list(skip), dtype=torch.bool)
        if not slots:
            return self._step(slots, xb, yb)
        parts: list[StepResult] = []
        start = 0
        while start < len(slots):
            size = len(slots) - start if self.max_chunk is None else min(self.max_chunk, len(slots) - start)
            end = start + size
            whole = start == 0 and end == len(slots)  # (the usual case: no slicing ops)
            chunk = tuple(inputs.apply(lambda t: t[start:end], v) for v in (xb, yb)) \
                if self.per_slot_data and not whole else (xb, yb)
            try:
                parts.append(self._step(slots[start:end], *chunk, None if mask is None else mask[start:end]))
                start = end
                continue
            except BaseException as exc:
                if not is_out_of_memory(exc):
                    raise
                partial = self.engine.partial_step  # the update had begun: a retry would apply it twice
                if size == 1 or partial:
                    if size > 1:
                        self._shrink(size)  # later steps still benefit
                    raise self._out_of_memory(len(slots), size, partial) from exc
            # Retry outside the except block, so the traceback no longer holds the failed step's tensors.
            if self.mb.device.type == "cuda":
                torch.cuda.empty_cache()
            self._shrink(size)
        return parts[0] if len(parts) == 1 else _concat(parts)

    def _shrink(self, failed: int) -> None:
        """Halve the chunk size after a step of ``failed`` slots ran out of memory; say so once."""
        self.max_chunk = (failed + 1) // 2
        logger.warning(
            "stack %s ran out of memory on %s in a fused step of %d slots; from now on it runs at most %d "
            "slots per fused step (same results per slot, slower). Fewer slots per stack (slots_per_host in a "
            "sweep) avoid this.",
            self.key, self.mb.device, failed, self.max_chunk,
        )

    def _out_of_memory(self, requested: int, failed: int, partial: bool) -> OutOfDeviceMemoryError:
        if partial:
            what = (f"in the optimizer update of a fused step of {failed} slot(s), which may have left them "
                    "partly updated, so the step cannot be retried")
        else:
            what = "even when running one slot per fused step"
        return OutOfDeviceMemoryError(
            f"stack {self.key} ran out of memory on {self.mb.device} {what} ({self.used} slots attached, "
            f"{requested} in this step). Fix: a smaller batch_size or model, fewer slots_per_host, or a "
            "device with more memory."
        )

    def evaluate(self, slots: list[int]) -> dict[str, list[float]]:
        """Validation metrics of ``slots`` (``val_`` not yet prefixed), one list entry per slot."""
        slots = list(slots)
        self.stats.evaluated += len(slots)
        if not self._exact_gathers() and not self._eval_gathers_exact():
            res = self._evaluate_rows(None)  # as in step(): the whole stack, then this call's rows
            self.stats.eval_rows += self.capacity
            return {k: [v[s] for s in slots] for k, v in res.items()}
        run = list(slots)
        if len(run) == 1 and self.capacity > 1:  # never a one-row gather
            run.append(next(i for i in range(self.capacity) if i != run[0]))
        self.stats.eval_rows += len(run)
        return {k: v[: len(slots)] for k, v in self._evaluate_rows(run).items()}

    def _evaluate_rows(self, rows: list[int] | None) -> dict[str, list[float]]:
        """The metrics of ``rows`` (None: every row of the stack), in that order."""
        res = self.engine.evaluate(self.x_val, self.y_val, self.settings.metrics, slots=rows,
                                   batch_size=self.settings.eval_batch_size)
        return {k: v.tolist() for k, v in res.items()}

    def _eval_gathers_exact(self) -> bool:
        """Whether evaluating a gather gives each slot the bits the whole stack gives it, measured.

        Measured once per stack size, on the stack's own validation set and
        the live weights of held slots (a free row's weights say nothing: a
        row of zeros gives zeros whichever kernel runs): the whole stack,
        then a gather of the first and last held rows and one of three held
        rows from the middle. Every metric of every gathered row must equal
        its whole-stack value bit for bit (NaN counts as equal to NaN);
        otherwise the stack evaluates whole, as before. Until a stack of at
        least four rows holds three slots, it evaluates whole, unmeasured.
        """
        cap, held = self.capacity, sorted(self.owner)
        if cap < 4 or self.x_val is None:
            return False
        if cap not in self._eval_exact:
            if len(held) < 3:
                return False  # measured later, on real weights
            mid = len(held) // 2
            whole = self._evaluate_rows(None)
            exact = True
            for rows in ([held[0], held[-1]], held[max(mid - 1, 0): mid + 2]):
                part = self._evaluate_rows(rows)
                exact = exact and part.keys() == whole.keys() and all(
                    _same_bits(part[k][j], whole[k][r]) for k in whole for j, r in enumerate(rows))
            self._eval_exact[cap] = exact
            logger.debug("stack %s (%d rows) evaluates %s", self.key, cap, "gathers" if exact else "whole")
        return self._eval_exact[cap]

    def finish(self, slots: Sequence[int]) -> dict[int, dict[str, Any]]:
        """End the current iteration of ``slots``: evaluate them, build their results, snapshot them."""
        slots = list(slots)
        if not slots:
            return {}
        val = self.evaluate(slots)
        train = self.meter.take(slots)
        out = {}
        for j, s in enumerate(slots):
            self.iteration[s] += 1
            out[s] = iteration_result(train[j], {k: v[j] for k, v in val.items()}, 0.0, 0,
                                      val_prefix="" if self.eval_fn is not None else "val_")
        self._plateau_step(slots, out)  # before the learning rate is read: the next step's rate
        lr, steps = torch.stack([self.opt.current_lr().double(), self.opt.steps.double()]).tolist()  # one sync
        for s in slots:
            out[s]["lr"], out[s]["slot_steps"] = lr[s], int(steps[s])
        self.snapshots.capture(self._tensors(), self._python_state(), slots,
                               [self.iteration[s] % self.snapshots.depth for s in slots])
        return out

    def _plateau_step(self, slots: list[int], results: Mapping[int, Mapping[str, Any]]) -> None:
        """Feed each slot's metric to its ReduceLROnPlateau rule (``plateau=`` in its hyperparameters), once
        per report, before the boundary is captured: snapshots and checkpoints hold the rule's state."""
        opts = getattr(self.opt, "parts", None) or {"": self.opt}
        if not any(getattr(o, "_plateau_any", False) for o in opts.values()):
            return
        metric = getattr(self.settings, "plateau_metric", None) or "val_loss"
        missing = [s for s in slots if metric not in results[s]]
        if missing:
            raise KeyError(f"a plateau= schedule steps on {metric!r}, which the results do not have (they have "
                           f"{sorted(results[missing[0]])}); pass batched_trainable(plateau_metric=<one of them>).")
        values = [float(results[s][metric]) for s in slots]
        for o in opts.values():
            o.plateau_step(slots, values)

    # ---------------------------------------------------------------- run-ahead
    def at_boundary(self, slot: int, iteration: int) -> bool:
        """Whether the slot's live state is its state after ``iteration`` (no step since)."""
        return self.iteration[slot] == iteration and self.meter.steps[slot] == 0

    def rollback(self, slot: int, iteration: int) -> None:
        """Put the slot back to its state after ``iteration`` (at most ``run_ahead`` iterations back)."""
        self._check_kept(slot, iteration)
        if self.at_boundary(slot, iteration):
            return
        self.snapshots.restore(self._tensors(), self._python_state(), slot, iteration % self.snapshots.depth)
        self.iteration[slot] = iteration
        self.meter.reset(slot)

    def _check_kept(self, slot: int, iteration: int) -> None:
        if not self.iteration[slot] - self.snapshots.depth < iteration <= self.iteration[slot]:
            raise ValueError(f"slot {slot} is at iteration {self.iteration[slot]}; the snapshots keep only the "
                             f"last {self.snapshots.depth} boundaries, not iteration {iteration}")

    # ----------------------------------------------------------- checkpoints
    def export(self, slot: int, iteration: int | None = None) -> bytes:
        """Everything a slot needs to continue elsewhere, as bytes: its state after ``iteration``
        (default: its live state), so a slot that ran ahead still exports what its consumer knows."""
        if iteration is None or self.at_boundary(slot, iteration):
            return self._export_live(slot)
        self._check_kept(slot, iteration)
        tensors, python = self._tensors(), self._python_state()
        live = self.snapshots.live_copy(tensors, python, slot)
        self.snapshots.restore(tensors, python, slot, iteration % self.snapshots.depth)
        try:
            return self._export_live(slot)
        finally:
            self.snapshots.put_back(tensors, python, slot, live)

    def _export_live(self, slot: int) -> bytes:
        own = self.mb.own_sizes[slot] or {}
        return checkpoint.to_bytes({
            "signature": self.mb.slot_signature(slot),
            "optimizer_class": optimizer_id(self.optimizer),
            "model": self.mb.slot_state(slot),
            "optimizer": self._optimizer_state(slot, own),
            "optimizer_layout": self.opt.layout() if hasattr(self.opt, "layout") else {
                str(dt): _layout(g.names, [own.get(n, sh) for n, sh in zip(g.names, g.shapes)])
                for dt, g in self.mb.groups.items()},
            "scaler": None if self.scaler is None else self.scaler.slot_state(slot),
            "stream": self.streams.slot_state(slot) if self.per_slot_data else None,
            "random": self.mb.random.state(slot),
        })

    def load(self, slot: int, blob: bytes, hparams: Mapping[str, Any]) -> None:
        """Restore a slot from :meth:`export` bytes, then apply this trial's own hyperparameters.

        The loaded state is the slot's new iteration-0 boundary. The bytes are
        plain tensors and types (:mod:`ray_modelbatch.checkpoint`); whether they
        fit is decided by the model's tensors, not by where its class was defined.
        """
        # On the CPU: each component copies into its own tensors wherever they live, and the data streams'
        # generator states must stay on the CPU (a CPU generator refuses a CUDA state).
        state = checkpoint.from_bytes(blob, "cpu")
        checkpoint.check_fits(state, self.mb.slot_signature(slot))
        own = self.mb.own_sizes[slot] or {}
        self.mb.load_slot(slot, state["model"])
        optimizer = state["optimizer"]
        if own:  # saved at the model's own shapes: into the stack's layout (see padded_stacks)
            optimizer = {**optimizer, "state": {
                key: {k: padded_stacks.pad_flat(v, g.names, g.shapes, own) for k, v in optimizer["state"][key].items()}
                for key, g in ((str(dt), g) for dt, g in self.mb.groups.items()) if key in optimizer["state"]}}
        self.opt.load_slot_state(slot, optimizer, hparams=False)
        self._set_hparams(slot, hparams, self.owner.get(slot))
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_slot_state(slot, state["scaler"])
        if self.per_slot_data and state.get("stream") is not None:
            self.streams.load_slot_state(slot, state["stream"])
        random = state.get("random")  # absent from checkpoints of older versions; another device's does not fit
        if random is not None and random.numel() == self.mb.random.states.shape[1]:
            self.mb.random.set_state(slot, random)
        self._begin(slot)

    def _optimizer_state(self, slot: int, own: Mapping[str, tuple]) -> dict[str, Any]:
        """The optimizer's export of ``slot``, at the model's ``own`` shapes where the stack pads it."""
        state = self.opt.slot_state(slot)
        if not own:
            return state
        groups = {str(dt): g for dt, g in self.mb.groups.items()}
        return {**state, "state": {key: {k: padded_stacks.unpad_flat(v, groups[key].names, groups[key].shapes, own)
                                         for k, v in per_key.items()} for key, per_key in state["state"].items()}}


def _layout(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> list[list]:
    """``[[name, offset, shape], ...]`` of tensors laid end to end in one flat buffer."""
    out, at = [], 0
    for n, sh in zip(names, shapes):
        out.append([n, at, list(sh)])
        at += int(torch.Size(sh).numel())
    return out


def _same_bits(a: float, b: float) -> bool:
    """Whether two metric values are the same number (NaN equals NaN: a diverged slot is no counterexample)."""
    return a == b or (a != a and b != b)


def _concat(parts: list[StepResult]) -> StepResult:
    """One StepResult from the results of consecutive chunks of slots, in their order."""
    tensors = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(StepResult)
               if f.name != "extras"}
    extras = {k: torch.cat([p.extras[k] for p in parts]) for k in parts[0].extras}
    return StepResult(**tensors, extras=extras)

