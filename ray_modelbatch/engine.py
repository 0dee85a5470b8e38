"""The fused engine: "run one step over these slots, evaluate these slots, hand back per-slot results".

This is the one interface both drivers use: the standalone :class:`Trainer`
and the Ray Tune slot host. It knows nothing about where batches come from or
where results go; it only runs the fused math for an explicit set of slots, so
slots that are not named do not advance at all.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .amp import SlotGradScaler
from .model_batch import ModelBatch, Slots
from .optim.base import VectorOptimizer

LossFn = Callable[[Any, Any], torch.Tensor]
MetricFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class StepResult:
    """Per-slot outcome of one fused training step (all tensors aligned with ``slots``)."""

    slots: torch.Tensor  # slot indices that ran, on the host
    losses: torch.Tensor  # [n] training loss of each slot (before the update)
    updated: torch.Tensor  # [n] bool: the slot's parameters were updated
    nonfinite: torch.Tensor  # [n] bool: loss or gradients were NaN/inf (or fp16 overflow)
    grad_norm: torch.Tensor  # [n] gradient norm before clipping


class FusedEngine:
    """Drive a ModelBatch, an optimizer and optionally a per-slot loss scaler.

    Args:
        mb: the stacked models.
        optimizer: a :mod:`ray_modelbatch.optim` optimizer built on ``mb``.
        loss_fn: ``loss_fn(output, target) -> scalar`` for *one* model; it is
            vmapped over slots, so write it as for a single model.
        scaler: a :class:`SlotGradScaler` for fp16 (optional).
        autocast_dtype: ``torch.bfloat16`` or ``torch.float16`` to run forward
            under autocast; ``None`` for full precision.
    """

    def __init__(
        self,
        mb: ModelBatch,
        optimizer: VectorOptimizer,
        loss_fn: LossFn,
        *,
        scaler: SlotGradScaler | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        if optimizer.mb is not mb:
            raise ValueError("the optimizer was built for a different ModelBatch; build it with this one")
        if autocast_dtype == torch.float16 and scaler is None:
            raise ValueError(
                "fp16 training needs per-slot loss scaling: pass scaler=SlotGradScaler(mb), or use "
                "autocast_dtype=torch.bfloat16, which needs none."
            )
        self.mb = mb
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype
        # True after a train_step that raised once the optimizer update had begun: its slots may be
        # partly updated, so running the step again would apply (part of) it twice.
        self.partial_step = False

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.mb.device.type, dtype=self.autocast_dtype)

    def _host_slots(self, slots: Slots) -> torch.Tensor:
        return self.mb._cpu_index(slots)

    def train_step(self, x: Any, y: Any, *, slots: Slots = "active", per_slot: bool = False,
                   skip: torch.Tensor | None = None) -> StepResult:
        """One forward, backward and optimizer step over ``slots`` (default: the active ones).

        ``per_slot=True`` means ``x``/``y`` carry a leading slot dimension
        aligned with ``slots``; otherwise every slot sees the same batch.

        ``skip`` (``[n]`` bool aligned with ``slots``) marks slots that run in
        the fused computation but must not move: their parameters, buffers,
        optimizer state and step counts stay exactly as they were, and their
        rows of the result say ``updated=False`` (``nonfinite`` stays False).
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
        idx = mb.resolve_slots(slots if isinstance(slots, str) else host)
        opt.zero_grad()
        self.partial_step = False
        # Forward updates buffers (BatchNorm statistics) in place; a slot whose
        # step is skipped must get those back, or a NaN batch poisons it; and a
        # step that raises before the update (e.g. out of memory) must leave
        # every slot as it was, so that it can be run again in smaller pieces.
        saved = {k: v.clone() for k, v in mb.buffers.items()}
        try:
            with self._autocast(), mb.gradients_into_buffer():
                losses, _ = mb.forward_loss(x, y, self.loss_fn, per_slot=per_slot, slots=idx)
            losses = losses.float()
            bad_loss = ~torch.isfinite(losses)
            if skip is not None:
                skip = skip.to(device=losses.device, dtype=torch.bool)
                bad_loss = bad_loss & ~skip
            (losses.sum() if self.scaler is None else self.scaler.scale(losses, idx)).backward()
        except BaseException:
            with torch.no_grad():
                for k, old in saved.items():
                    mb.buffers[k].copy_(old)
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
        if skip is not None:
            nonfinite = nonfinite & ~skip
        still = nonfinite if skip is None else nonfinite | skip  # rows that did not move: their buffers go back
        if saved:
            skipped = still
            if idx is not None:
                skipped = torch.zeros(mb.num_slots, dtype=torch.bool, device=mb.device).index_copy(0, idx, still)
            with torch.no_grad():
                for k, old in saved.items():
                    cur = mb.buffers[k]
                    cur.copy_(torch.where(skipped.view(-1, *[1] * (cur.dim() - 1)), old, cur))
        self.partial_step = False
        updated = ~still
        return StepResult(host, losses.detach(), updated, nonfinite, grad_norm)

    @torch.no_grad()
    def evaluate(
        self,
        x: Any,
        y: Any,
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
                (``[n, N, ...]`` with ``per_slot=True``).
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
        fns = {**({"loss": self.loss_fn} if mask is None else {}), **(metrics or {})}
        if host.numel() == 0:
            return {k: torch.zeros(0, device=mb.device) for k in fns}
        if per_slot:  # select the slots' rows once, so chunks below line up with ``host``
            idx = mb.resolve_slots(host)
            x, _ = mb._prepare_x(x, True, idx)
            y, _ = mb._prepare_x(y, True, idx, "targets")
            if mask is not None:
                mask, _ = mb._prepare_x(mask, True, idx, "mask")
        axis = 1 if per_slot else 0
        total = x.shape[axis]
        step = batch_size or total
        sums = {k: torch.zeros(host.numel(), dtype=torch.float64, device=mb.device) for k in fns}
        counts = torch.zeros(host.numel(), dtype=torch.float64, device=mb.device)
        was_training = mb.training
        mb.eval()
        try:
            for start in range(0, total, step):
                xb = x.narrow(axis, start, min(step, total - start))
                yb = y.narrow(axis, start, min(step, total - start))
                mb_ = None if mask is None else mask.narrow(1, start, xb.shape[axis]).to(torch.float64)
                with self._autocast():
                    out = mb(xb, per_slot=per_slot, slots=host)
                ydim = 0 if per_slot else None
                w = float(xb.shape[axis]) if mb_ is None else mb_.sum(1)
                for name, fn in fns.items():
                    val = torch.vmap(fn, in_dims=(0, ydim))(out, yb).double()
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
