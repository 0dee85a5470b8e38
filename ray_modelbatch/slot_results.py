"""What a slot reports after each iteration, accumulated over its steps: defined here, once.

Both drivers of fused training, the standalone :class:`~ray_modelbatch.Trainer`
and the Ray Tune slot host, report the same figures under the same keys:

- ``train_loss``, ``grad_norm``: means over the iteration's finite steps
  (NaN when every step of the iteration was non-finite);
- ``nonfinite_steps``: steps of the iteration that were skipped because the
  loss or the gradients were NaN/inf (or an fp16 overflow);
- ``lr``: the learning rate of the slot's next step (schedule applied);
- ``slot_steps``: optimizer steps the slot has taken in all;
- ``val_<name>``: each validation metric (with ``val_loss``); with a user's
  ``eval_step``, its metrics under the user's own names instead;
- the other values a user's ``train_step`` returns besides ``"loss"``, under
  their own names: means over the iteration's finite steps.

:class:`IterationMeter` keeps the sums on the device, one entry per slot,
and adds a whole fused step to them with a few batched ops: no per-slot
Python work and no device sync until a slot's iteration is read.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from .engine import StepResult



def iteration_result(train: Mapping[str, Any], val: Mapping[str, float], lr: float, slot_steps: int,
                     val_prefix: str = "val_") -> dict[str, Any]:
    """One slot's result for one iteration, under the keys every driver reports."""
    out = {**train, "lr": lr, "slot_steps": int(slot_steps)}
    for k, v in val.items():
        name = f"{val_prefix}{k}"
        if name in out:
            raise ValueError(f"the evaluation reports {name!r}, which the training step reports too; rename one "
                             "of them (the keys a result already has: " + ", ".join(sorted(out)) + ").")
        out[name] = v
    return out


class IterationMeter:
    """Per-slot sums over the steps of the current iteration.

    ``steps[s]`` (host side) counts the steps slot ``s`` ran in this
    iteration, so a driver knows without a device sync which slots finished
    an iteration; the loss and gradient-norm sums stay on the device.
    """

    def __init__(self, capacity: int, device: torch.device | str):
        self.device = torch.device(device)
        self.steps = [0] * capacity
        self._sums = torch.zeros(4, capacity, dtype=torch.float64, device=self.device)  # loss, grad, finite, nonfinite
        self._extras: dict[str, torch.Tensor] = {}  # a user step's other values: sums over finite steps
        self._whole = torch.arange(0)  # the slot indices of a whole-stack step, kept (see add)

    def add(self, result: StepResult, ran: Sequence[int]) -> None:
        """Add one fused step: ``result`` rows are the slots in ``result.slots``; ``ran`` lists those not masked."""
        for s in ran:
            self.steps[s] += 1
        ok = result.updated
        # One [4, n] float64 block (stack promotes the float32 losses and the booleans exactly); the loss and
        # norm of a slot that did not update count as 0, NaN or not: nine small ops a step became five.
        rows = torch.stack([result.losses, result.grad_norm, ok, result.nonfinite]).to(torch.float64)
        rows[:2].masked_fill_(~ok, 0.0)
        idx = result.slots if result.slots.device == self.device else result.slots.to(self.device)
        n = idx.numel()
        if len(self._whole) != n:
            self._whole = torch.arange(n)
        whole = n == self._sums.shape[1] and bool(result.slots.equal(self._whole))
        if whole:
            self._sums.add_(rows)
        else:
            self._sums.index_add_(1, idx, rows)
        for name, value in result.extras.items():
            sums = self._extras.get(name)
            if sums is None:
                sums = self._extras[name] = torch.zeros(self._sums.shape[1], dtype=torch.float64, device=self.device)
            value = torch.where(ok, value.double(), 0.0)
            sums.add_(value) if whole else sums.index_add_(0, idx, value)

    def take(self, slots: Sequence[int]) -> list[dict[str, Any]]:
        """The train figures of ``slots``' iterations (one sync), and start their next iteration."""
        if not slots:
            return []
        idx = torch.as_tensor(list(slots), dtype=torch.long, device=self.device)
        names = list(self._extras)
        table = torch.cat([self._sums, *(self._extras[k].unsqueeze(0) for k in names)]).index_select(1, idx)
        loss, grad, finite, nonfinite, *extra = table.tolist()  # one sync
        self._sums.index_fill_(1, idx, 0.0)
        for sums in self._extras.values():
            sums.index_fill_(0, idx, 0.0)
        for s in slots:
            self.steps[s] = 0
        nan = math.nan
        out = [{"train_loss": l / n if n else nan, "grad_norm": g / n if n else nan, "nonfinite_steps": int(b)}
               for l, g, n, b in zip(loss, grad, finite, nonfinite)]
        for name, values in zip(names, extra):
            for row, v, n in zip(out, values, finite):
                row[name] = v / n if n else nan
        return out

    def reset(self, slot: int) -> None:
        """Forget a slot's partial iteration (a new model, a restore, a rollback)."""
        self.steps[slot] = 0
        self._sums[:, slot] = 0.0
        for sums in self._extras.values():
            sums[slot] = 0.0

    def resize(self, keep: Sequence[int], capacity: int) -> None:
        sums = torch.zeros(4, capacity, dtype=torch.float64, device=self.device)
        sums[:, : len(keep)] = self._sums[:, list(keep)]
        self._sums = sums
        for name, old in self._extras.items():
            new = torch.zeros(capacity, dtype=torch.float64, device=self.device)
            new[: len(keep)] = old[list(keep)]
            self._extras[name] = new
        self.steps = [self.steps[k] for k in keep] + [0] * (capacity - len(keep))
