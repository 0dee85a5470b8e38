"""The fused engine: "run one step over these slots, evaluate these slots, hand back per-slot results".

This is the one interface both drivers use: the standalone :class:`Trainer`
and the Ray Tune slot host. It knows nothing about where batches come from or
where results go; it only runs the fused math for an explicit set of slots, so
slots that are not named do not advance at all.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from . import inputs, slot_losses
from .amp import SlotGradScaler
from .errors import is_out_of_memory
from .metrics import slot_batched
from .model_batch import ModelBatch, Slots
from .optim.base import VectorOptimizer
from .step_config import SlotConfigs

LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], torch.Tensor]
StepFn = Callable[[torch.nn.Module, Any, Mapping[str, Any]], Any]


def split_step_output(out: Any, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(losses [n], {other name: [n]})`` from what a user's step returned for every slot.

    A step returns its loss, or a dict whose ``"loss"`` is backpropagated and
    whose other entries are reported.
    """
    if isinstance(out, torch.Tensor):
        loss, extras = out, {}
    elif isinstance(out, Mapping) and "loss" in out:
        loss = out["loss"]
        extras = {k: v for k, v in out.items() if k != "loss"}
    else:
        got = f"a dict with keys {sorted(out)}" if isinstance(out, Mapping) else type(out).__name__
        raise TypeError(f"{name} must return its loss (a scalar tensor) or a dict with a 'loss' entry; it "
                        f"returned {got}.")
    for key, value in {"loss": loss, **extras}.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 1:
            shape = list(value.shape[1:]) if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"{name} returned {key!r} of shape {shape} for one model; each value it returns must "
                            "be a scalar tensor (e.g. loss.mean(), or torch.as_tensor(x) for a number).")
    return loss, {k: v.detach() for k, v in extras.items()}


def check_loss_shape(losses: torch.Tensor, loss_fn: Any) -> None:
    """A loss function must give one number per model: ``losses`` is ``[n]`` (one per slot)."""
    if losses.dim() != 1:
        name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
        raise TypeError(f"the loss {name!r} returned a tensor of shape {list(losses.shape[1:])} for one model; it "
                        "must return one number (a scalar tensor). Fix: reduce it, e.g. reduction='mean' (not "
                        "'none'), or loss=lambda out, y: F.cross_entropy(out, y, reduction='none').mean().")


@dataclass
class StepResult:
    """Per-slot outcome of one fused training step (all tensors aligned with ``slots``)."""

    slots: torch.Tensor  # slot indices that ran, on the host
    losses: torch.Tensor  # [n] training loss of each slot (before the update)
    updated: torch.Tensor  # [n] bool: the slot's parameters were updated
    nonfinite: torch.Tensor  # [n] bool: loss or gradients were NaN/inf (or fp16 overflow)
    grad_norm: torch.Tensor  # [n] gradient norm before clipping
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # [n] other values a user's step returned


class FusedEngine:
    """Drive a ModelBatch, an optimizer and optionally a per-slot loss scaler.

    Args:
        mb: the stacked models.
        optimizer: a :mod:`ray_modelbatch.optim` optimizer built on ``mb``.
        loss_fn: ``loss_fn(output, target) -> scalar`` for *one* model; it is
            vmapped over slots, so write it as for a single model.
        step_fn: instead of ``loss_fn``, the whole training step for one model:
            ``step_fn(model, (x, y), config)`` returns the loss, or a dict whose
            ``"loss"`` is backpropagated and whose other entries are reported
            (see :meth:`ModelBatch.run_step`). Batches without targets (``y`` is
            None: a dict batch that holds its own ``labels``) reach it as ``x``
            alone, so a Hugging Face step is ``model(**batch).loss``.
        eval_fn: ``eval_fn(model, (x, y), config) -> {name: value}`` for one
            model, run on validation batches instead of ``loss_fn``/metrics.
        configs: each slot's config, for ``step_fn``/``eval_fn``.
        scaler: a :class:`SlotGradScaler` for fp16 (optional).
        autocast_dtype: ``torch.bfloat16`` or ``torch.float16`` to run forward
            under autocast; ``None`` for full precision.
    """

    def __init__(
        self,
        mb: ModelBatch,
        optimizer: VectorOptimizer,
        loss_fn: LossFn | None = None,
        *,
        step_fn: StepFn | None = None,
        eval_fn: StepFn | None = None,
        configs: SlotConfigs | None = None,
        scaler: SlotGradScaler | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        if (loss_fn is None) == (step_fn is None):
            raise ValueError("give the engine either loss_fn (a loss of output and target) or step_fn (a whole "
                             "training step for one model), not both")
        if not hasattr(optimizer, "mb"):
            from . import optim

            name = type(optimizer).__name__
            ours = name if isinstance(getattr(optim, name, None), type) else "Adam"
            raise TypeError(
                f"FusedEngine takes a fused optimizer built on the ModelBatch; got {type(optimizer).__module__}."
                f"{name}. Fix: ray_modelbatch.optim.{ours}(mb, lr=...), torch's keywords, each value one number "
                "for all slots or one per slot.")
        if optimizer.mb is not mb:
            raise ValueError("the optimizer was built for a different ModelBatch; build it with this one")
        if isinstance(step_fn, Mapping):  # one step per part of the model, each with its own optimizer
            parts = getattr(optimizer, "parts", None)
            if parts is None or list(parts) != list(step_fn):
                raise ValueError(f"train_step has steps for parts {list(step_fn)}; give one optimizer per part in the "
                                 f"same order (optimizer={{part: class}}), got {list(parts or [])}.")
            if scaler is not None:
                raise ValueError("fp16 loss scaling is not supported for models trained in parts; use "
                                 "autocast_dtype=torch.bfloat16")
        if autocast_dtype == torch.float16 and scaler is None:
            raise ValueError(
                "fp16 training needs per-slot loss scaling: pass scaler=SlotGradScaler(mb), or use "
                "autocast_dtype=torch.bfloat16, which needs none."
            )
        self.mb = mb
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.step_fn, self.eval_fn, self.configs = step_fn, eval_fn, configs
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype
        # True after a train_step that raised once the optimizer update had begun: its slots may be
        # partly updated, so running the step again would apply (part of) it twice.
        self.partial_step = False

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.mb.device.type, dtype=self.autocast_dtype)

    def _mlp_step(self, x: Any, y: Any, per_slot: bool, idx: torch.Tensor | None) -> torch.Tensor | None:
        """The hand-written MLP step's losses, or None where it does not apply. Where it raises (an input or
        labels that do not fit the model), None too: the general path below runs the step again and either
        trains (the same numbers, through autograd) or raises an error that names the problem and the fix."""
        try:
            return self.mb.mlp_train_step(x, y, self.loss_fn, per_slot=per_slot, slots=idx)
        except Exception as exc:  # noqa: BLE001 - explained by the general path
            if is_out_of_memory(exc):
                raise
            self.optimizer.zero_grad()  # whatever it wrote to the gradients before it raised
            return None

    def _host_slots(self, slots: Slots) -> torch.Tensor:
        return self.mb._cpu_index(slots)

    def train_step(self, x: Any, y: Any = None, *, slots: Slots = "active", per_slot: bool = False,
                   skip: torch.Tensor | None = None) -> StepResult:
        """One forward, backward and optimizer step over ``slots`` (default: the active ones).

        ``per_slot=True`` means ``x``/``y`` carry a leading slot dimension
        aligned with ``slots``; otherwise every slot sees the same batch.

        ``x`` may be a dict of keyword inputs (``{"input_ids": ..., "attention_mask":
        ..., "labels": ...}``): the model is called ``model(**x)`` and a step gets
        the dict itself when ``y`` is None (see :mod:`ray_modelbatch.inputs`).

        ``skip`` (``[n]`` bool aligned with ``slots``) marks slots that run in
        the fused computation but must not move: their parameters, buffers,
        optimizer state, step counts and dropout generators (:mod:`.slot_random`)
        stay exactly as they were, and their rows of the result say
        ``updated=False`` (``nonfinite`` stays False).
        Stepping a whole stack with a mask keeps every slot's arithmetic the
        same whichever slots are masked, which a gather of a subset does not
        always do, and saves the gather where most slots step.
        """
        mb, opt = self.mb, self.optimizer
        host = self._host_slots(slots)
        if host.numel() == 0:
            empty = torch.zeros(0, device=mb.device)
            return StepResult(host, empty, empty.bool(), empty.bool(), empty)
        mb.train()
        # Resolved once for every piece below; None means every slot (the fast path, no gathers).
        idx = mb.resolve_slots(slots) if isinstance(slots, str) else mb._resolve_index(host)
        if isinstance(self.step_fn, Mapping):
            return self._train_parts(x, y, per_slot, idx, host, skip)
        opt.zero_grad()
        self.partial_step = False
        mb.random.begin()  # the step's draws, undone for masked rows and failed steps (slot_random)
        # Forward updates buffers (BatchNorm statistics) in place; a slot whose
        # step is skipped must get those back, or a NaN batch poisons it; and a
        # step that raises before the update (e.g. out of memory) must leave
        # every slot as it was, so that it can be run again in smaller pieces.
        saved = {k: v.detach().clone() for k, v in mb.forward_state().items()}
        try:
            # An MLP stack with a common loss: forward and backward by hand (mlp_step), no autograd.
            losses = self._mlp_step(x, y, per_slot, idx) \
                if self.step_fn is None and self.scaler is None and self.autocast_dtype is None else None
            manual, extras = losses is not None, {}
            if not manual:
                with self._autocast(), mb.gradients_into_buffer():
                    if self.step_fn is not None:
                        losses, extras = split_step_output(self._run_user(self.step_fn, x, y, per_slot, idx),
                                                           "train_step")
                    else:
                        (losses, _), extras = mb.forward_loss(x, y, self.loss_fn, per_slot=per_slot, slots=idx), {}
                        check_loss_shape(losses, self.loss_fn)
            if losses.dtype != torch.float32:  # (a no-op .float() is a dispatcher call too)
                losses = losses.float()
            bad_loss = ~(losses.abs() < math.inf)  # NaN compares False: three ops where isfinite takes six
            if skip is not None and (skip.dtype != torch.bool or skip.device != losses.device):
                skip = skip.to(device=losses.device, dtype=torch.bool)
            if not manual:
                (losses.sum() if self.scaler is None else self.scaler.scale(losses, idx)).backward()
        except BaseException:
            with torch.no_grad():
                for k, old in saved.items():
                    mb.forward_state()[k].copy_(old)
            mb.random.revert()  # a retry draws the same dropout masks
            raise
        self.partial_step = True  # until this step returns
        held = bad_loss if skip is None else bad_loss | skip
        if self.scaler is not None:
            self.scaler.step(opt, idx, skip=held)
            self.scaler.update(idx, keep=skip)
        else:
            opt.step(idx, skip=held)
        nonfinite = opt.last_nonfinite if idx is None else opt.last_nonfinite.index_select(0, idx)
        grad_norm = opt.last_grad_norm if idx is None else opt.last_grad_norm.index_select(0, idx)
        nonfinite = nonfinite | bad_loss
        still = nonfinite if skip is None else nonfinite | skip  # rows that did not move: their buffers go back
        if skip is not None:  # a masked row reports no non-finite step (its loss may be anything)
            nonfinite = nonfinite & ~skip
        _restore_buffers(mb, saved, still, idx)
        if skip is not None and mb.random.drew:  # masked rows did not step: their generators do not move
            mb.random.revert(host[skip.cpu()].tolist())
        self.partial_step = False
        updated = ~still
        return StepResult(host, losses.detach(), updated, nonfinite, grad_norm, extras)

    def _train_parts(self, x: Any, y: Any, per_slot: bool, idx: torch.Tensor | None, host: torch.Tensor,
                     skip: torch.Tensor | None) -> StepResult:
        """One step of a model trained in parts: each part's step, backward and update in turn.

        As a user writes it for one model: ``opt_D.zero_grad(); d_step(...).backward();
        opt_D.step()``, then the same for G, whose loss sees the updated D. Each part
        skips its own update where its loss or gradients are not finite. The
        slot's loss is the sum of the parts' losses; each part's is reported as
        ``loss_<part>``.
        """
        mb, opts = self.mb, self.optimizer.parts
        n = host.numel()
        skip = None if skip is None else skip.to(device=mb.device, dtype=torch.bool)
        saved = {k: v.detach().clone() for k, v in mb.forward_state().items()}
        total = torch.zeros(n, device=mb.device)
        nonfinite = torch.zeros(n, dtype=torch.bool, device=mb.device)
        norms = torch.zeros(n, device=mb.device)
        extras: dict[str, torch.Tensor] = {}
        rows = (lambda t: t) if idx is None else (lambda t: t.index_select(0, idx))  # noqa: E731
        self.partial_step = False
        mb.random.begin()  # every part's draws: undone for masked rows and a step that can be retried
        try:
            for part, fn in self.step_fn.items():
                opt = opts[part]
                mb.zero_grad()
                with self._autocast():
                    loss, more = split_step_output(self._run_user(fn, x, y, per_slot, idx), f"train_step[{part!r}]")
                loss = loss.float()
                bad = ~torch.isfinite(loss)
                if skip is not None:
                    bad = bad & ~skip
                loss.sum().backward()
                self.partial_step = True  # an earlier part may have moved: a retry would apply it twice
                opt.step(idx, skip=bad if skip is None else bad | skip)
                nonfinite |= rows(opt.last_nonfinite) | bad
                norms += rows(opt.last_grad_norm).float().square()
                total += torch.where(torch.isfinite(loss), loss.detach(), 0.0)
                extras[f"loss_{part}"] = loss.detach()
                extras.update(more)
        except BaseException:
            if not self.partial_step:
                with torch.no_grad():
                    for k, old in saved.items():
                        mb.forward_state()[k].copy_(old)
                mb.random.revert()
            raise
        if skip is not None and mb.random.drew:
            mb.random.revert(host[skip.cpu()].tolist())
        if skip is not None:
            nonfinite = nonfinite & ~skip
        still = nonfinite if skip is None else nonfinite | skip
        _restore_buffers(mb, saved, still, idx)
        self.partial_step = False
        losses = torch.where(nonfinite, torch.nan, total)
        return StepResult(host, losses, ~still, nonfinite, norms.sqrt(), extras)

    def _run_user(self, fn: StepFn, x: Any, y: Any, per_slot: bool, idx: torch.Tensor | None) -> Any:
        """``fn(model, (x, y), config)`` (``fn(model, x, config)`` when ``y`` is None) for the slots ``idx``
        (None: all), each with its own config values."""
        config, values = self.configs.for_rows(idx) if self.configs is not None else ({}, {})
        return self.mb.run_step(fn, inputs.step_batch(x, y), config, values, per_slot=per_slot, slots=idx)

    @torch.no_grad()
    def evaluate(
        self,
        x: Any,
        y: Any = None,
        metrics: Mapping[str, MetricFn] | None = None,
        *,
        slots: Slots = "active",
        per_slot: bool = False,
        mask: torch.Tensor | None = None,
        batch_size: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Evaluate ``slots`` in eval mode; returns ``{name: [n] tensor}`` including ``"loss"``.

        Args:
            x, y: the validation set, shared (``[N, ...]``) or per slot
                (``[n, N, ...]`` with ``per_slot=True``); ``x`` may be a dict of
                keyword inputs and ``y`` None (as in :meth:`train_step`).
            metrics: ``{name: fn(output, target)}`` for one model. A metric may
                return a scalar (averaged over chunks by size) or one value per
                example (averaged over the valid examples).
            mask: ``[n, N]`` bool marking valid examples when per-slot sets are
                padded to one length (e.g. k-fold); needs per-example metrics.
            batch_size: evaluate in chunks of this many examples.
        """
        mb = self.mb
        host = self._host_slots(slots)
        # The training loss reduces to one value per batch, which cannot be
        # averaged over padded per-slot sets; with a mask only metrics count.
        user = self.eval_fn if self.eval_fn is not None else self.step_fn
        fns = {} if user is not None else {**({"loss": self.loss_fn} if mask is None else {}), **(metrics or {})}
        if host.numel() == 0:
            return {k: torch.zeros(0, device=mb.device) for k in fns}
        if per_slot:  # select the slots' rows once, so chunks below line up with ``host``
            idx = mb.resolve_slots(host)
            x, _ = mb._prepare_x(x, True, idx)
            y, _ = mb._prepare_x(y, True, idx, "targets")
            if mask is not None:
                mask, _ = mb._prepare_x(mask, True, idx, "mask")
        axis = 1 if per_slot else 0
        total = inputs.num_rows(x, axis)
        step = batch_size or total
        sums: dict[str, torch.Tensor] = {}
        counts = torch.zeros(host.numel(), dtype=torch.float64, device=mb.device)
        rows = mb.resolve_slots(host)
        was_training = mb.training
        mb.eval()
        try:
            for start in range(0, total, step):
                size = min(step, total - start)
                xb, yb = (inputs.apply(lambda t: t.narrow(axis, start, size), v) for v in (x, y))
                mb_ = None if mask is None else mask.narrow(1, start, size).to(torch.float64)
                with self._autocast():
                    vals = self._eval_values(user, fns, xb, yb, per_slot, host, rows)
                w = float(size) if mb_ is None else mb_.sum(1)
                for name, val in vals.items():
                    val = val.double()
                    if name not in sums:
                        sums[name] = torch.zeros(host.numel(), dtype=torch.float64, device=mb.device)
                    if val.dim() == 2:  # per-example values
                        sums[name] += (val * mb_).sum(1) if mb_ is not None else val.sum(1)
                    elif mb_ is not None:
                        raise ValueError(
                            f"metric {name!r} returns one value per batch, but the per-slot validation sets are "
                            "padded (mask given); make it return one value per example (reduction='none')."
                        )
                    else:
                        sums[name] += val * w
                counts += w
        finally:
            mb.train(was_training)
        return {k: (v / counts).float() for k, v in sums.items()}

    def _eval_values(self, user: StepFn | None, fns: Mapping[str, MetricFn], x: Any, y: Any, per_slot: bool,
                     host: torch.Tensor, rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """``{name: [n] or [n, B]}`` values of one validation chunk: the user's eval (or train) step, or
        the loss and metrics of the outputs."""
        if user is None:
            out = self.mb(x, per_slot=per_slot, slots=host)
            ydim = 0 if per_slot and y is not None else None
            return _metric_values(fns, out, y, ydim)
        if isinstance(user, Mapping):  # parts, no eval_step: each part's step on validation data
            out: dict[str, torch.Tensor] = {}
            for part, fn in user.items():
                loss, extras = split_step_output(self._run_user(fn, x, y, per_slot, rows), f"train_step[{part!r}]")
                out.update({f"loss_{part}": loss, **extras})
            return out
        res = self._run_user(user, x, y, per_slot, rows)
        if user is self.step_fn:  # no eval_step: the training step's values on validation data
            loss, extras = split_step_output(res, "train_step")
            return {"loss": loss, **extras}
        if not isinstance(res, Mapping):
            raise TypeError(f"eval_step must return a dict of metrics ({{name: value}}); it returned "
                            f"{type(res).__name__}.")
        bad = {k: list(v.shape[1:]) for k, v in res.items() if not isinstance(v, torch.Tensor) or v.dim() > 2}
        if bad:
            raise TypeError(f"eval_step returned values that are not one number (or one per example) per model: "
                            f"{bad}; return scalars such as (pred == y).float().mean().")
        return dict(res)


def _metric_values(fns: Mapping[str, MetricFn], out: Any, y: Any, ydim: int | None) -> dict[str, torch.Tensor]:
    """``{name: fn(out[i], y_i)}`` for every slot ``i``: the common losses and the library's metrics in one
    batched call each (:func:`~ray_modelbatch.slot_losses.per_slot_loss`,
    :func:`~ray_modelbatch.metrics.slot_batched`), every other metric in one shared ``torch.vmap``.

    Each vmap call is a fixed Python cost (a digits-MLP evaluation of 3 slots
    took 0.55 ms with a vmap per metric, 0.38 ms like this), and vmapping
    ``F.cross_entropy`` runs torch's ``nll_loss`` decomposition, whose first
    call imported sympy on the slot host's engine thread mid-sweep (0.72 s).
    """
    values: dict[str, torch.Tensor] = {}
    rest: dict[str, MetricFn] = {}
    for name, fn in fns.items():
        batched = slot_losses.per_slot_loss(fn, out, y, per_slot_targets=ydim is not None)
        if batched is None:
            batched = slot_batched(fn, out, y, per_slot_targets=ydim is not None)
        if batched is None:
            rest[name] = fn
        else:
            values[name] = batched
    if rest:
        values.update(torch.vmap(lambda o, t: {name: fn(o, t) for name, fn in rest.items()}, in_dims=(0, ydim))(out, y))
    return {name: values[name] for name in fns}


def _restore_buffers(mb: ModelBatch, saved: dict[str, torch.Tensor], still: torch.Tensor,
                     idx: torch.Tensor | None) -> None:
    """Put back what the forward changed in place (BatchNorm statistics, :meth:`ModelBatch.forward_state`) in the
    rows ``still`` marks (``[n]``, aligned with ``idx``; None: every slot), from ``saved``, as it was before the step.

    On a CPU, asking whether any row is marked costs no device sync, and in a
    step where every row steps and every loss is finite none is: the restore's
    ~20 small ops are then skipped (0.05-0.08 ms of the CNN sweep's 6-16 ms
    steps, about 1%). On a GPU the question would sync the host with the
    device, so the masked copy always runs.
    """
    if not saved or (still.device.type == "cpu" and not bool(still.any())):
        return
    skipped = still if idx is None else torch.zeros(
        mb.num_slots, dtype=torch.bool, device=mb.device).index_copy(0, idx, still)
    with torch.no_grad():
        state = mb.forward_state()
        for k, old in saved.items():
            cur = state[k]
            cur.copy_(torch.where(skipped.view(-1, *[1] * (cur.dim() - 1)), old, cur))
