"""Per-slot dynamic loss scaling for fp16 training.

One shared GradScaler lets a single diverging model skip the update of every
model in the batch and lowers everyone's scale. Here each slot has its own
scale and growth tracker: an overflow in one slot skips only that slot's update
and backs off only that slot's scale (``torch.amp.GradScaler`` semantics per slot).
"""

from __future__ import annotations

from typing import Any

import torch

from .model_batch import ModelBatch, Slots
from .optim.base import VectorOptimizer


class SlotGradScaler:
    """Loss scaler with an independent scale per slot.

    Usage per step::

        total = scaler.scale(losses, slots)   # sum of per-slot scaled losses
        total.backward()
        scaler.step(opt, slots)               # unscale, skip overflowed slots, step the rest
        scaler.update(slots)                  # back off / grow each slot's scale
    """

    def __init__(
        self,
        mb: ModelBatch,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
    ):
        if not (growth_factor > 1.0 and 0.0 < backoff_factor < 1.0 and growth_interval >= 1 and init_scale > 0):
            raise ValueError(
                "SlotGradScaler needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and "
                "growth_interval >= 1 (the torch.amp.GradScaler rules)."
            )
        self.mb = mb
        self.enabled = enabled
        self.init_scale = init_scale
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        s = mb.num_slots
        self.scales = torch.full((s,), float(init_scale), dtype=torch.float32, device=mb.device)
        self.growth_tracker = torch.zeros(s, dtype=torch.int64, device=mb.device)
        self.found_inf: torch.Tensor | None = None
        mb.attach(self)

    def _rows(self, t: torch.Tensor, slots: Slots) -> torch.Tensor:
        idx = self.mb.resolve_slots(slots)
        return t if idx is None else t.index_select(0, idx)

    def scale(self, losses: torch.Tensor, slots: Slots = "active") -> torch.Tensor:
        """Sum of ``losses[j] * scale[slot j]``: backpropagate this instead of ``losses.sum()``."""
        if not self.enabled:
            return losses.sum()
        return (losses.float() * self._rows(self.scales, slots)).sum()

    @torch.no_grad()
    def unscale_(self) -> None:
        """Divide each slot's gradients by its scale (rows of slots that did not run are zero)."""
        if not self.enabled:
            return
        inv = self.scales.reciprocal().unsqueeze(1)
        self.mb.sync_grads()
        for g in self.mb.groups.values():
            g.grad.mul_(inv.to(g.grad.dtype))

    def step(self, optimizer: VectorOptimizer, slots: Slots = "active", skip: torch.Tensor | None = None) -> torch.Tensor:
        """Unscale and step; slots with non-finite gradients are skipped. Returns that ``[n]`` mask."""
        self.mb.sync_grads()
        self.unscale_()
        optimizer.step(slots, skip=skip)
        self.found_inf = self._rows(optimizer.last_nonfinite, slots)
        return self.found_inf

    @torch.no_grad()
    def update(self, slots: Slots = "active", found_inf: torch.Tensor | None = None,
               keep: torch.Tensor | None = None) -> None:
        """Back off the scale of slots that overflowed, grow it after ``growth_interval`` clean steps.

        ``keep`` (``[n]`` bool aligned with ``slots``) marks slots that were masked out of the step:
        their scale and growth count stay as they were.
        """
        if not self.enabled:
            return
        found = self.found_inf if found_inf is None else found_inf
        if found is None:
            raise RuntimeError("SlotGradScaler.update() needs a preceding step() or an explicit found_inf")
        idx = self.mb.resolve_slots(slots)
        scales, tracker = self._rows(self.scales, slots), self._rows(self.growth_tracker, slots)
        tracker = torch.where(found, 0, tracker + 1)
        grow = tracker >= self.growth_interval
        scales = torch.where(found, scales * self.backoff_factor, torch.where(grow, scales * self.growth_factor, scales))
        tracker = torch.where(grow, 0, tracker)
        if keep is not None:
            keep = keep.to(device=scales.device, dtype=torch.bool)
            scales = torch.where(keep, self._rows(self.scales, slots), scales)
            tracker = torch.where(keep, self._rows(self.growth_tracker, slots), tracker)
        if idx is None:
            self.scales.copy_(scales)
            self.growth_tracker.copy_(tracker)
        else:
            self.scales.index_copy_(0, idx, scales)
            self.growth_tracker.index_copy_(0, idx, tracker)
        self.found_inf = None

    # ------------------------------------------------------------ slot state
    def slot_tensors(self) -> dict[str, torch.Tensor]:
        """Every per-slot tensor of this scaler (dim 0 is the slot): see :mod:`ray_modelbatch.slot_state`."""
        return {"scaler.scales": self.scales, "scaler.growth_tracker": self.growth_tracker}

    def slot_state(self, i: int) -> dict[str, Any]:
        """Slot ``i``'s loss scale and growth counter (for its checkpoint)."""
        return {"scale": float(self.scales[i]), "growth_tracker": int(self.growth_tracker[i])}

    def load_slot_state(self, i: int, state: dict[str, Any]) -> None:
        """Restore what :meth:`slot_state` returned into slot ``i``."""
        self.scales[i] = state["scale"]
        self.growth_tracker[i] = state["growth_tracker"]

    def _on_reset(self, i: int) -> None:
        self.scales[i] = self.init_scale
        self.growth_tracker[i] = 0

    def _on_copy(self, src: int, dst: int) -> None:
        self.scales[dst] = self.scales[src]
        self.growth_tracker[dst] = self.growth_tracker[src]

    def _on_resize(self, keep: list[int], capacity: int) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.mb.device)
        scales = torch.full((capacity,), float(self.init_scale), dtype=torch.float32, device=self.mb.device)
        tracker = torch.zeros(capacity, dtype=torch.int64, device=self.mb.device)
        scales[: len(keep)] = self.scales.index_select(0, idx)
        tracker[: len(keep)] = self.growth_tracker.index_select(0, idx)
        self.scales, self.growth_tracker = scales, tracker
