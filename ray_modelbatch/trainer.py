"""Standalone (no Ray) training loop over a :class:`~ray_modelbatch.FusedEngine`.

The engine does the fused math for an explicit list of slots, and a
:class:`~ray_modelbatch.slot_group.SlotGroup` around it steps them and keeps
each slot's iteration sums, as it does for a Ray Tune slot host. This module
only decides *which* slots run each step and *where* their results go
(history, TensorBoard, progress bar); nothing here imports Ray.

Per step the trainer:

1. has the group step the active slots (``mb.active``): a batch from the
   stream, then ``engine.train_step(..., slots=active)``, so paused slots do
   not move (a step that runs out of device memory is rerun in chunks),
2. reads the step's per-slot tensors (and, on evaluation steps, the
   validation metrics and learning rates) in ONE device-to-host transfer, so
   a GPU run synchronizes at most once per step,
3. records non-finite steps per slot and deactivates slots that stay
   non-finite for ``max_nonfinite_steps`` steps in a row (diverged),
4. every ``eval_every`` steps: records a result per slot, logs it to
   TensorBoard, applies early stopping and updates the progress bar.
"""

from __future__ import annotations

import math
import sys
from typing import IO, Any, Mapping, Sequence, Union

import torch
from torch import nn

from . import checkpoint, inputs
from .data import PerSlotStreams, SharedStream
from .engine import FusedEngine, MetricFn
from .errors import IncompatibleModelsError
from .slot_group import SlotGroup
from .slot_results import iteration_result
from .slot_state import collect_tensors
from .tensorboard import SlotWriter

__all__ = ["EarlyStopping", "History", "Trainer", "STATUSES"]

# "inactive": the slot was not active when training started (the caller paused it).
STATUSES = ("active", "early_stopped", "diverged", "finished", "inactive")

Stream = Union[SharedStream, PerSlotStreams]
ValData = Union[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class EarlyStopping:
    """Per-slot early stopping on one recorded metric.

    A slot whose ``metric`` has not improved by more than ``min_delta`` on its
    best value for ``patience`` consecutive evaluations is stopped; the
    trainer then deactivates it, so it costs no more compute and its weights
    stay exactly as they were. Each slot keeps its own best value and
    counter, because slots of a sweep learn at very different speeds.

    A stopped slot keeps the weights of the step it stopped at, ``patience``
    evaluations after its best, unless ``restore_best=True`` (Keras's
    ``restore_best_weights``): the trainer then keeps each slot's parameters
    and buffers at its best evaluation and puts them back when the slot
    stops, so ``mb.slot_module(slot, ...)`` gives the model
    ``History.best(slot)`` reports. Slots that run to the end of ``fit`` keep
    their last weights either way.

    Args:
        metric: a key of the trainer's results, e.g. ``"val_loss"`` or
            ``"val_accuracy"`` (``"loss"`` is read as ``"val_loss"`` when only
            that exists), or ``"train_loss"`` without validation data.
        mode: ``"min"`` or ``"max"``.
        patience: evaluations without improvement before a slot stops (>= 1).
        min_delta: the improvement that counts as one.
        restore_best: put a stopped slot's best weights back (one copy of each
            slot's weights is kept).
    """

    def __init__(self, metric: str, mode: str = "min", patience: int = 5, min_delta: float = 0.0,
                 restore_best: bool = False):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.metric = metric
        self.mode = mode
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.restore_best = bool(restore_best)
        self.best: dict[int, float] = {}
        self.best_step: dict[int, int] = {}
        self.bad_evals: dict[int, int] = {}

    def update(self, slot: int, value: float, step: int | None = None) -> bool:
        """Record ``value`` for ``slot``; True when the slot should stop now.

        A NaN/inf value never counts as an improvement.
        """
        slot = int(slot)
        if _better(value, self.best.get(slot), self.mode, self.min_delta if slot in self.best else 0.0):
            self.best[slot] = float(value)
            if step is not None:
                self.best_step[slot] = int(step)
            self.bad_evals[slot] = 0
            return False
        self.bad_evals[slot] = self.bad_evals.get(slot, 0) + 1
        return self.bad_evals[slot] >= self.patience

    def reset_slot(self, slot: int) -> None:
        """Forget a slot's history (a new model was loaded into it)."""
        for d in (self.best, self.best_step, self.bad_evals):
            d.pop(int(slot), None)

    def state_dict(self) -> dict[str, Any]:
        """Each slot's best value, its step and its evaluations without improvement (plain types)."""
        return {"best": dict(self.best), "best_step": dict(self.best_step), "bad_evals": dict(self.bad_evals)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.best = {int(k): float(v) for k, v in state["best"].items()}
        self.best_step = {int(k): int(v) for k, v in state.get("best_step", {}).items()}
        self.bad_evals = {int(k): int(v) for k, v in state["bad_evals"].items()}


class History:
    """What happened to every slot: evaluation results, non-finite steps and final status.

    Attributes:
        results: ``results[slot]`` is the list of that slot's result dicts, in
            order; each has ``"step"`` (trainer steps so far) and the keys of
            :func:`~ray_modelbatch.slot_results.iteration_result`, which a Tune
            trial reports too: ``"train_loss"`` and ``"grad_norm"`` (means over
            the finite steps since the last evaluation), ``"nonfinite_steps"``,
            ``"lr"`` (the rate of the slot's next step), ``"slot_steps"`` and the
            validation metrics as ``"val_<name>"``.
        nonfinite: ``{slot: [steps]}`` for slots that had NaN/inf steps
            (skipped, parameters untouched); slots without any are absent.
        status: per slot, one of ``STATUSES``.
        stopped_at: ``{slot: step}`` where a slot was early-stopped or diverged.
        restored: ``{slot: step}`` for early-stopped slots whose weights were put back to those of
            that step, their best (``EarlyStopping(restore_best=True)``).
        replaced: ``{slot: [earlier models' results, ...]}``: the results a slot recorded before
            :meth:`Trainer.replace_slot` gave it a new model, oldest first (``results`` holds the
            current model's only).
        metric, mode: what :meth:`best` ranks by unless told otherwise.
    """

    def __init__(self, num_slots: int, metric: str | None = None, mode: str = "min"):
        self.results: list[list[dict[str, Any]]] = [[] for _ in range(num_slots)]
        self.nonfinite: dict[int, list[int]] = {}
        self.status: list[str] = ["active"] * num_slots
        self.stopped_at: dict[int, int] = {}
        self.restored: dict[int, int] = {}
        self.replaced: dict[int, list[list[dict[str, Any]]]] = {}
        self.metric = metric
        self.mode = mode

    @property
    def num_slots(self) -> int:
        return len(self.results)

    def __getitem__(self, slot: int) -> list[dict[str, Any]]:
        return self.results[slot]

    def _metric(self, slot: int, metric: str | None) -> str | None:
        if metric is not None:
            return metric
        if self.metric is not None:
            return self.metric
        last = self.results[slot][-1] if self.results[slot] else {}
        return "val_loss" if "val_loss" in last else ("train_loss" if "train_loss" in last else None)

    def best(self, slot: int, metric: str | None = None, mode: str | None = None) -> dict[str, Any] | None:
        """The slot's result with the best finite ``metric`` (default: the early-stopping metric,
        else ``val_loss``, else ``train_loss``); None if it has none."""
        metric, mode = self._metric(slot, metric), mode or self.mode
        best, best_val = None, None
        for r in self.results[slot]:
            v = r.get(metric)
            if v is not None and _better(float(v), best_val, mode):
                best, best_val = r, float(v)
        return best

    def final(self, slot: int) -> dict[str, Any] | None:
        """The slot's last recorded result (for a stopped slot: the one it stopped on)."""
        return self.results[slot][-1] if self.results[slot] else None

    def to_records(self) -> list[dict[str, Any]]:
        """Every result as a flat dict with ``"slot"`` and ``"status"`` added (e.g. for a DataFrame)."""
        return [{"slot": s, "status": self.status[s], **r} for s in range(self.num_slots) for r in self.results[s]]

    def summary(self) -> list[dict[str, Any]]:
        """One dict per slot: status, where it stopped, its best and final results, non-finite step count."""
        out = []
        for s in range(self.num_slots):
            best, final = self.best(s), self.final(s)
            out.append({
                "slot": s,
                "status": self.status[s],
                "stopped_at": self.stopped_at.get(s),
                "nonfinite_steps": len(self.nonfinite.get(s, [])),
                **{f"best_{k}": v for k, v in (best or {}).items()},
                **{f"final_{k}": v for k, v in (final or {}).items()},
            })
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything recorded, as plain types (the lists themselves, not copies)."""
        return {"results": self.results, "nonfinite": self.nonfinite, "status": self.status,
                "stopped_at": self.stopped_at, "restored": self.restored, "replaced": self.replaced,
                "metric": self.metric, "mode": self.mode}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a copy: later results do not change ``state``)."""
        if len(state["results"]) != self.num_slots:
            raise ValueError(f"this History state has {len(state['results'])} slots; this History {self.num_slots}")
        self.results = [[dict(r) for r in rs] for rs in state["results"]]
        self.nonfinite = {int(k): list(v) for k, v in state["nonfinite"].items()}
        self.status = list(state["status"])
        self.stopped_at = {int(k): int(v) for k, v in state["stopped_at"].items()}
        self.restored = {int(k): int(v) for k, v in state.get("restored", {}).items()}
        self.replaced = {int(k): [[dict(r) for r in rs] for rs in v] for k, v in state.get("replaced", {}).items()}
        self.metric, self.mode = state["metric"], state["mode"]


def _tag(key: str) -> str:
    """Result key -> TensorBoard tag, grouping train and validation curves."""
    if key.startswith("val_"):
        return "val/" + key[4:]
    if key.startswith("train_"):
        return "train/" + key[6:]
    return "train/" + key


def _hparam_value(v: Any) -> Any:
    """A schedule parameter as TensorBoard's HParams take it: a number, a bool or a string (milestone lists,
    ``one_cycle``'s anneal strategy) as they read."""
    if isinstance(v, (bool, str)):
        return v
    try:
        return float(v)
    except (TypeError, ValueError):
        return str(v)


def flat_hparams(hp: Mapping[str, Any]) -> dict[str, Any]:
    """Optimizer hyperparameters of one slot as TensorBoard-friendly scalars (betas and schedule split)."""
    out: dict[str, Any] = {}
    for k, v in hp.items():
        if k == "betas":
            out["beta1"], out["beta2"] = float(v[0]), float(v[1])
        elif k == "schedule":
            out["schedule"] = v.kind
            out.update({f"schedule_{pk}": _hparam_value(pv) for pk, pv in v.params.items()})
        elif isinstance(v, (bool, int, float, str)):
            out[k] = v
        else:
            out[k] = str(v)
    return out


class Trainer:
    """Train the active slots of an engine's ModelBatch; evaluate, log, stop slots.

    Args:
        engine: the :class:`FusedEngine` (ModelBatch + optimizer + loss).
        train: a :class:`SharedStream` (every slot sees the same batch), a
            :class:`PerSlotStreams` (each slot its own batches), an
            :class:`IterableStreams` (a DataLoader or any iterable of batches)
            or a :class:`DatasetStreams` (a map-style Dataset, sampled per slot).
        val: ``(x, y)`` shared by every slot, or ``(xs, ys, mask)`` with a
            leading slot dimension (see :func:`~ray_modelbatch.data.padded_per_slot`),
            or None.
        metrics: ``{name: fn(output, target)}`` for one model; recorded as
            ``val_<name>``. With shared validation data the engine's loss is
            added as ``val_loss``; padded per-slot data needs per-example
            metrics (:mod:`ray_modelbatch.metrics`), since a batch-mean loss
            cannot be averaged over padding.
        eval_every: evaluate, log and apply early stopping every this many
            steps (and after the last step of :meth:`fit`).
        early_stopping: optional :class:`EarlyStopping`.
        logdir: write one TensorBoard run per slot under it (or pass ``writer``).
        progress: show a tqdm bar (to ``progress_file``, default stderr).
        eval_batch_size: evaluate in chunks of this many examples.
        max_nonfinite_steps: consecutive NaN/inf steps after which a slot is
            deactivated and marked diverged.
        hparams: optional per-slot dicts logged to TensorBoard's HParams tab
            (default: the optimizer's hyperparameters of each slot).
        slot_names: run directory names per slot (default ``slot_NNN``).
        writer: a :class:`SlotWriter` to use instead of creating one from ``logdir``.
    """

    def __init__(
        self,
        engine: FusedEngine,
        train: Stream,
        val: ValData | None = None,
        *,
        metrics: Mapping[str, MetricFn] | None = None,
        eval_every: int = 50,
        early_stopping: EarlyStopping | None = None,
        logdir: str | None = None,
        progress: bool = True,
        eval_batch_size: int | None = None,
        max_nonfinite_steps: int = 10,
        hparams: Sequence[Mapping[str, Any]] | None = None,
        slot_names: Sequence[str] | Mapping[int, str] | None = None,
        writer: SlotWriter | None = None,
        progress_file: IO[str] | None = None,
    ):
        mb = engine.mb
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {eval_every}")
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        if not hasattr(train, "next_batch") or not hasattr(train, "per_slot"):
            raise TypeError(
                f"train must be a stream of batches; got {type(train).__name__}. Fix: SharedStream(x, y, batch_size) "
                "or PerSlotStreams for tensors; IterableStreams(...) for a DataLoader or any iterable of batches; "
                "DatasetStreams(...) for a Dataset (see ray_modelbatch.iterable_streams and dataset_streams).")
        if train.per_slot and getattr(train, "num_slots", mb.num_slots) != mb.num_slots:
            raise ValueError(f"the per-slot streams have {train.num_slots} slots, the ModelBatch {mb.num_slots}")
        if hparams is not None and len(hparams) != mb.num_slots:
            raise ValueError(f"hparams has {len(hparams)} entries; give one dict per slot ({mb.num_slots})")
        self.engine = engine
        self.train = train
        self.metrics = dict(metrics or {})
        self.val_per_slot = False
        self.val: tuple[Any, ...] | None = None
        if val is not None:
            # x may be a dict of keyword inputs (a Hugging Face batch) and y None (its labels inside x)
            self.val = tuple(None if v is None else inputs.apply(lambda t: t.to(mb.device), v) for v in val)
            if len(self.val) == 3:
                if not all(isinstance(v, torch.Tensor) for v in self.val):
                    raise TypeError("per-slot validation data (xs, ys, mask) must be three tensors; for dict batches "
                                    "give val=(x, y) shared by every slot, with y None when the labels are in x")
                self.val_per_slot = True
                xs, ys, mask = self.val
                if xs.shape[0] != mb.num_slots or ys.shape[0] != mb.num_slots or tuple(mask.shape) != tuple(xs.shape[:2]):
                    raise ValueError(
                        f"per-slot validation data must be (xs [S, N, ...], ys [S, N, ...], mask [S, N]) with "
                        f"S = {mb.num_slots}; got shapes {list(xs.shape)}, {list(ys.shape)}, {list(mask.shape)}"
                    )
                if not self.metrics:
                    raise ValueError(
                        "padded per-slot validation needs per-example metrics, e.g. metrics={'loss': "
                        "ray_modelbatch.metrics.cross_entropy, 'accuracy': ray_modelbatch.metrics.accuracy}"
                    )
            elif len(self.val) != 2:
                raise ValueError("val must be (x, y) shared by every slot or (xs, ys, mask) per slot")
            elif all(isinstance(v, torch.Tensor) for v in self.val) and self.val[0].shape[0] != self.val[1].shape[0]:
                raise ValueError(f"val=(x, y) has {self.val[0].shape[0]} inputs but {self.val[1].shape[0]} labels; "
                                 "give one label row per input row")
        self.eval_every = int(eval_every)
        self.early_stopping = early_stopping
        self.eval_batch_size = eval_batch_size
        self.max_nonfinite_steps = int(max_nonfinite_steps)
        self.progress = progress
        self.progress_file = progress_file
        self.hparams = hparams
        self.writer = writer if writer is not None else (
            SlotWriter(logdir, num_slots=mb.num_slots, names=slot_names) if logdir is not None else None
        )
        s = mb.num_slots
        es = early_stopping
        self.history = History(s, metric=es.metric if es else None, mode=es.mode if es else "min")
        active = set(self._active())
        self.history.status = ["active" if i in active else "inactive" for i in range(s)]
        self.step_count = 0
        self._consecutive_bad = [0] * s
        self._best_weights: dict[int, dict[str, torch.Tensor]] = {}  # EarlyStopping(restore_best=True)'s copies
        # The group steps the slots (splitting a fused step that runs out of device memory) and keeps
        # the per-slot sums a result is made of; the trainer decides which slots step and when to report.
        self.group = SlotGroup.around(engine, train, steps_per_report=self.eval_every)
        self._best_any: float | None = None
        self._es_key: str | None = None
        self._hparams_logged_at: dict[int, int] = {}

    # ------------------------------------------------------------- helpers
    @property
    def mb(self):
        return self.engine.mb

    def _active(self) -> list[int]:
        """Active slots from the host-side mask (no device sync)."""
        return self.mb.active.nonzero().flatten().tolist()

    def _eval_tensors(self, slots: list[int], index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Validation metrics ``{val_<name>: [n]}`` of ``slots``, left on the device.

        ``index`` is ``slots`` as a device tensor when the caller has one
        (``mb.active_slots``), which saves a blocking host-to-device copy.
        """
        if self.val is None or not slots:
            return {}
        eng = self.engine
        if self.val_per_slot:
            xs, ys, mask = self.val
            if len(slots) != self.mb.num_slots:
                # The engine selects rows of a per-slot x but not of y and mask,
                # so align all three with the slots here.
                idx = index if index is not None else torch.as_tensor(slots, dtype=torch.long, device=xs.device)
                xs, ys, mask = xs.index_select(0, idx), ys.index_select(0, idx), mask.index_select(0, idx)
            out = eng.evaluate(xs, ys, self.metrics, slots=slots, per_slot=True, mask=mask,
                               batch_size=self.eval_batch_size)
        else:
            x, y = self.val
            out = eng.evaluate(x, y, self.metrics, slots=slots, batch_size=self.eval_batch_size)
        return {f"val_{k}": v for k, v in out.items()}

    def evaluate(self, slots: Sequence[int] | None = None) -> dict[int, dict[str, float]]:
        """Validation metrics of ``slots`` (default: the active ones) as ``{slot: {val_<name>: value}}``."""
        slots = self._active() if slots is None else [int(s) for s in slots]
        ev = self._eval_tensors(slots)
        if not ev:
            return {s: {} for s in slots}
        keys = list(ev)
        rows = torch.stack([ev[k].double() for k in keys]).tolist()
        return {s: {k: rows[r][j] for r, k in enumerate(keys)} for j, s in enumerate(slots)}

    def _resolve_es_key(self, result: Mapping[str, Any]) -> str:
        es = self.early_stopping
        assert es is not None
        if self._es_key is None:
            for key in (es.metric, f"val_{es.metric}"):
                if key in result:
                    self._es_key = key
                    break
            else:
                raise KeyError(
                    f"early stopping metric {es.metric!r} is not recorded; available: {sorted(result)}. "
                    "Validation metrics are named val_<name>."
                )
            self.history.metric = self._es_key
        return self._es_key

    def _stop(self, slots: list[int], status: str) -> None:
        if not slots:
            return
        self.mb.deactivate(slots)
        for s in slots:
            self.history.status[s] = status
            self.history.stopped_at[s] = self.step_count

    # ---------------------------------------------------------------- step
    def run_step(self, evaluate: bool = False) -> list[tuple[int, dict[str, Any]]]:
        """One training step of the active slots; returns the ``(slot, result)`` pairs recorded.

        Results are recorded (and logged, and early stopping applied) only when
        ``evaluate`` is true; every step records non-finite slots and stops
        diverged ones.
        """
        active = self._active()
        if not active:
            return []
        mb, eng = self.mb, self.engine
        res = self.group.train_step(active)
        self.group.meter.add(res, active)
        self.step_count += 1
        step = self.step_count

        parts = [res.nonfinite.double()]
        keys: list[str] = []
        if evaluate:
            # mb.active_slots is `active` already on the device (cached by the
            # ModelBatch), so no host-to-device copy, which would synchronize.
            idx = mb.active_slots
            ev = self._eval_tensors(active, idx)
            keys = list(ev)
            parts += [ev[k].double() for k in keys]
            opt = eng.optimizer
            parts += [opt.current_lr().index_select(0, idx).double(), opt.steps.index_select(0, idx).double()]
        rows = torch.stack([p.to(mb.device) for p in parts]).tolist()  # the step's one device sync

        diverged = []
        for j, s in enumerate(active):
            if rows[0][j]:
                self.history.nonfinite.setdefault(s, []).append(step)
                self._consecutive_bad[s] += 1
                if self._consecutive_bad[s] >= self.max_nonfinite_steps:
                    diverged.append(s)
            else:
                self._consecutive_bad[s] = 0

        recorded: list[tuple[int, dict[str, Any]]] = []
        stopped = []
        if evaluate:
            train = self.group.meter.take(active)
            for j, s in enumerate(active):
                val = {k[len("val_"):]: rows[1 + r][j] for r, k in enumerate(keys)}
                result: dict[str, Any] = {"step": step, **iteration_result(train[j], val, rows[-2][j], rows[-1][j])}
                self.history.results[s].append(result)
                recorded.append((s, result))
                if self.writer is not None:
                    self.writer.log(s, {_tag(k): v for k, v in result.items() if k != "step"}, step)
                if self.early_stopping is not None and s not in diverged:
                    key = self._resolve_es_key(result)
                    if self.early_stopping.update(s, result[key], step):
                        stopped.append(s)
                    elif self.early_stopping.restore_best and self.early_stopping.best_step.get(s) == step:
                        self._best_weights[s] = self._weights(s)
                self._track_best(result)
        self._stop(diverged, "diverged")
        for s in stopped:
            best = self._best_weights.pop(s, None)
            if best is not None:
                self._put_weights(s, best)
                self.history.restored[s] = self.early_stopping.best_step.get(s)
        self._stop(stopped, "early_stopped")
        return recorded

    def _weights(self, slot: int) -> dict[str, torch.Tensor]:
        """A copy of ``slot``'s parameters and buffers (its rows of the stacked tensors)."""
        return {k: t[slot].detach().clone() for k, t in {**self.mb.params, **self.mb.buffers}.items()}

    def _put_weights(self, slot: int, weights: Mapping[str, torch.Tensor]) -> None:
        tensors = {**self.mb.params, **self.mb.buffers}
        with torch.no_grad():
            for k, v in weights.items():
                tensors[k][slot].copy_(v)

    def _track_best(self, result: Mapping[str, Any]) -> None:
        key = self.history.metric or ("val_loss" if "val_loss" in result else "train_loss")
        v = result.get(key)
        if v is not None and _better(float(v), self._best_any, self.history.mode):
            self._best_any = float(v)

    # ----------------------------------------------------------------- fit
    def fit(self, steps: int) -> History:
        """Train for up to ``steps`` steps (fewer if every slot stops); returns the :class:`History`.

        Can be called again to continue; step numbers keep counting.
        """
        from tqdm.auto import tqdm

        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"fit(steps) takes a number of steps >= 0; got {steps!r}")

        hist = self.history
        for s in self._active():
            hist.status[s] = "active"
        bar = tqdm(total=steps, disable=not self.progress, file=self.progress_file or sys.stderr,
                   desc="fused", unit="step", leave=True)
        try:
            for i in range(steps):
                last = i == steps - 1
                do_eval = (self.step_count + 1) % self.eval_every == 0 or last
                recorded = self.run_step(evaluate=do_eval)
                bar.update(1)
                if recorded or do_eval:
                    post = {"active": len(self._active())}
                    if self._best_any is not None:
                        post["best"] = f"{self._best_any:.4g}"
                    bar.set_postfix(post, refresh=False)
                if not self._active():
                    break
        finally:
            bar.close()
        for s in self._active():
            hist.status[s] = "finished"
        if self.writer is not None:
            self._log_hparams()
            self.writer.flush()
        return hist

    def _log_hparams(self) -> None:
        opt = self.engine.optimizer
        for s in range(self.mb.num_slots):
            # Once per slot per fit that gave it new results (a slot stopped in
            # an earlier fit is not logged again).
            n = len(self.history.results[s])
            if n == self._hparams_logged_at.get(s, 0):
                continue
            self._hparams_logged_at[s] = n
            hp = dict(self.hparams[s]) if self.hparams is not None else flat_hparams(opt.get_hparams(s))
            key = self.history._metric(s, None)
            best = self.history.best(s, key)
            final = self.history.final(s) or {}
            mets = {f"hparam/final_{k}": v for k, v in final.items() if k != "step"}
            if best is not None and key:
                mets[f"hparam/best_{key}"] = best[key]
            self.writer.log_hparams(s, hp, mets)

    # ------------------------------------------------------------ replace
    def replace_slot(self, slot: int, model: nn.Module, hparams: Mapping[str, Any] | None = None,
                     name: str | None = None) -> None:
        """Train a new model in ``slot`` from the next step on, as a fresh start of its own.

        The slot gets ``model``'s weights and fresh optimizer state (with
        ``hparams``, the optimizer's keywords, for this slot), and is active
        again. Its record starts over: the old model's results move to
        ``history.replaced[slot]``, so ``history.best(slot)`` and early
        stopping judge the new model alone, and its TensorBoard curves go to
        a new run (``name``, default ``<old run>_r<k>``). Its batches go on
        where the slot's stream was (a per-slot stream gets a seed of its own
        with ``train.reset_slot(slot, seed)``).
        """
        slot = int(slot)
        mb, hist = self.mb, self.history
        mb.reset_slot(slot, model)
        if hparams:
            self.engine.optimizer.set_hparams(slot, **hparams)
        if self.hparams is not None:  # the user's HParams of the old model: the optimizer's, for the new one
            self.hparams = [*self.hparams[:slot], flat_hparams(self.engine.optimizer.get_hparams(slot)),
                            *self.hparams[slot + 1:]]
        self.group.meter.take([slot])  # the old model's pending sums
        if self.early_stopping is not None:
            self.early_stopping.reset_slot(slot)
        hist.replaced.setdefault(slot, []).append(hist.results[slot])
        hist.results[slot] = []
        for d in (hist.stopped_at, hist.restored, hist.nonfinite):
            d.pop(slot, None)
        hist.status[slot] = "active"
        self._consecutive_bad[slot] = 0
        self._best_weights.pop(slot, None)
        if self.writer is not None:
            self.writer.reset_slot(slot, name or f"{self.writer.run_name(slot)}_r{len(hist.replaced[slot])}")
        self._hparams_logged_at.pop(slot, None)
        mb.activate([slot])

    # ------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`fit` needs to go on exactly where it stopped, as plain tensors and types.

        The slots' weights, buffers and dropout generators, which slots are
        active, the optimizer (moments, step counts, hyperparameters), the loss
        scaler, the training stream's position, early stopping, the history and
        the step count: ``torch.save`` it, and a new Trainer over models of
        the same architecture continues bit for bit after
        :meth:`load_state_dict` (on the CPU). Take it between :meth:`fit`
        calls: each ends with an evaluation, so no step's sums are pending.
        """
        if any(self.group.meter.steps):
            raise RuntimeError("Trainer.state_dict() is taken between fit() calls: steps since the last evaluation "
                               "have sums not yet recorded (after run_step(), call run_step(evaluate=True) first)")
        mb, eng, es = self.mb, self.engine, self.early_stopping
        if hasattr(self.train, "state_dict"):
            stream = {"all": self.train.state_dict()}
        elif self.train.per_slot and hasattr(self.train, "slot_state"):
            stream = {"slots": [self.train.slot_state(i) for i in range(mb.num_slots)]}
        else:
            raise TypeError(f"the training stream ({type(self.train).__name__}) cannot save its position, so the "
                            "trainer cannot be resumed; use SharedStream, PerSlotStreams or DatasetStreams")
        return {
            "format": 1,
            # every per-slot tensor of the stack and the scaler (slot_state's protocol: weights, buffers,
            # dropout generators, loss scales); the optimizer's own state_dict adds its hyperparameters
            "signature": mb.slot_signature(0),  # every slot's model: what decides whether the state fits
            "tensors": {k: t.detach().clone() for k, t in collect_tensors([mb, eng.scaler]).items()},
            "active": mb.active.clone(),
            "optimizer": eng.optimizer.state_dict(),
            "stream": stream,
            "early_stopping": None if es is None else es.state_dict(),
            "history": self.history.state_dict(),
            "step_count": self.step_count,
            "consecutive_bad": list(self._consecutive_bad),
            "best_weights": {s: {k: v.clone() for k, v in w.items()} for s, w in self._best_weights.items()},
            "best_any": self._best_any,
            "es_key": self._es_key,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`: this Trainer's models must have the same architecture, its
        optimizer the same class, its stream the same kind (see :meth:`state_dict`)."""
        mb, eng, es = self.mb, self.engine, self.early_stopping
        if state.get("format") != 1:
            raise ValueError("not a Trainer.state_dict(): load what Trainer.state_dict() returned")
        checkpoint.check_fits(state, mb.slot_signature(0))
        tensors = collect_tensors([mb, eng.scaler])
        saved = state["tensors"]
        wrong = sorted(set(tensors) ^ set(saved)) or sorted(k for k in saved if tensors[k].shape != saved[k].shape)
        if wrong:
            raise IncompatibleModelsError(f"this Trainer's stack does not fit the saved state ({wrong[:3]}): resume "
                                          "with the same number of slots and the same loss scaling")
        if (es is None) != (state["early_stopping"] is None):
            raise ValueError("the saved trainer " + ("had" if es is None else "had no") + " early stopping; "
                             "resume with the same early_stopping setting")
        eng.optimizer.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for k, v in saved.items():
                tensors[k].copy_(v)
        active = state["active"].tolist()
        mb.activate([i for i, a in enumerate(active) if a])
        mb.deactivate([i for i, a in enumerate(active) if not a])
        if "all" in state["stream"]:
            self.train.load_state_dict(state["stream"]["all"])
        else:
            for i, st in enumerate(state["stream"]["slots"]):
                if st is not None:
                    self.train.load_slot_state(i, st)
        if es is not None:
            es.load_state_dict(state["early_stopping"])
        self.history.load_state_dict(state["history"])
        self.step_count = int(state["step_count"])
        self._consecutive_bad = list(state["consecutive_bad"])
        self._best_weights = {int(s): dict(w) for s, w in state["best_weights"].items()}
        self._best_any, self._es_key = state["best_any"], state["es_key"]

    def close(self) -> None:
        """Close the TensorBoard writers."""
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
