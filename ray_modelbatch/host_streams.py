"""Per-slot streams over tensors kept in host memory: for training sets that do not fit on the device.

:class:`~ray_modelbatch.data.PerSlotStreams` keeps ``x``/``y`` on the stack's
device and gathers each step's rows there. When the training set is larger
than device memory, :class:`HostTensorStreams` keeps it in host memory,
gathers the step's ``[n, B]`` rows on the host (one ``index_select`` per
tensor) and copies only that batch to the device, once per step. The slots'
samplers are exactly those of ``PerSlotStreams`` (permutations are drawn on
the CPU in both), so slot ``i`` sees the same rows either way.

On a CUDA device the rows are gathered straight into a pinned staging buffer
(from PyTorch's caching host allocator, which keeps it alive until the copy
that reads it has finished), so the host-to-device copy is ``non_blocking``
and overlaps the step. The source tensors themselves need not be pinned:
pinning them would only help a copy that reads them directly, and would lock
the whole training set in RAM.

:func:`to_device` and :func:`expand_skipped` are shared with
:mod:`ray_modelbatch.dataset_streams`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .data import PerSlotStreams

__all__ = ["HostTensorStreams", "to_device", "expand_skipped", "staging"]


def staging(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty host tensor to build a batch in: pinned when it is bound for a CUDA device."""
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=device.type == "cuda")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One copy of a host batch to ``device`` (``non_blocking`` when the batch is pinned); no copy on the CPU."""
    if t.device == device:
        return t
    return t.to(device, non_blocking=t.is_pinned())


def expand_skipped(t: torch.Tensor, live: Sequence[int], n: int) -> torch.Tensor:
    """``[k, B, ...]`` batches of the live rows as ``[n, B, ...]``: row ``live[j]`` is ``t[j]``, others repeat ``t[0]``.

    Skipped slots are masked out of the step, so any rows do for them; the
    first live slot's are what :meth:`PerSlotStreams.next_batch` uses too.
    Done on the device after the copy, so a skipped slot costs no transfer.
    """
    if len(live) == n:
        return t
    src = torch.zeros(n, dtype=torch.long)
    src[torch.as_tensor(list(live), dtype=torch.long)] = torch.arange(len(live))
    return t.index_select(0, src.to(t.device))


class HostTensorStreams:
    """:class:`PerSlotStreams` with ``x``/``y`` in host memory; each step's batch is copied to ``device``.

    Same interface and the same batches as ``PerSlotStreams(x, y, batch_size,
    seeds, indices)`` (``per_slot = True``, ``next_batch``, ``capture_slot``,
    ``restore_slot``, ``reset_slot``, ``resize``, ``slot_state``,
    ``load_slot_state``), so a stack can use either.

    Args:
        x, y: the training set, rows on dim 0; moved to host memory if they are elsewhere.
        batch_size: rows per slot per step.
        seeds: one seed per slot.
        indices: one LongTensor of row numbers per slot; default all rows.
        device: where batches go (the stack's device); default the CPU.
    """

    per_slot = True

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seeds: Sequence[int],
                 indices: Sequence[torch.Tensor] | None = None, device: torch.device | str | None = None):
        # The samplers and their bookkeeping are PerSlotStreams' own, on the host.
        self.host = PerSlotStreams(x.cpu(), y.cpu(), batch_size, seeds, indices, device="cpu")
        self._device = torch.device(device) if device is not None else torch.device("cpu")

    @property
    def x(self) -> torch.Tensor:
        return self.host.x

    @property
    def y(self) -> torch.Tensor:
        return self.host.y

    @property
    def batch_size(self) -> int:
        return self.host.batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_slots(self) -> int:
        return self.host.num_slots

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    def steps_per_epoch(self, slot: int | None = None) -> int:
        """Steps in one epoch of ``slot`` (its rows // batch_size; the incomplete batch is dropped).

        ``slot=None``: an epoch of the whole training set.
        """
        if slot is None:
            return self.num_examples // self.batch_size
        sampler = self.host.samplers[slot]
        if sampler is None:
            raise RuntimeError(f"slot {slot} has no data stream yet; call reset_slot({slot}, seed) first")
        return sampler.batches_per_epoch

    def next_batch(self, slots: Sequence[int] | torch.Tensor,
                   skip: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(xb [n, B, ...], yb [n, B, ...])`` on the device, as :meth:`PerSlotStreams.next_batch` gives.

        Only the live slots' rows are gathered and copied; skipped slots
        (``skip[j]``) do not advance and get the first live slot's rows.
        """
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        slots = list(slots)
        n, b = len(slots), self.batch_size
        live = [j for j in range(n) if skip is None or not skip[j]]
        for j in live:
            if self.host.samplers[slots[j]] is None:
                raise RuntimeError(f"slot {slots[j]} has no data stream yet; call reset_slot({slots[j]}, seed) first")
        if live:
            idx = torch.cat([next(self.host.samplers[slots[j]]) for j in live])
        elif n:
            idx = torch.arange(b) % self.num_examples  # every slot skipped: any rows do
        else:
            idx = torch.zeros(0, dtype=torch.long)
        k = len(live) if live else min(n, 1)
        out = []
        for t in (self.x, self.y):
            buf = staging((idx.numel(), *t.shape[1:]), t.dtype, self._device)
            torch.index_select(t, 0, idx, out=buf)
            out.append(to_device(buf.view(k, b, *t.shape[1:]), self._device))
        if not n:
            return out[0], out[1]
        rows = live if live else [0]
        return expand_skipped(out[0], rows, n), expand_skipped(out[1], rows, n)

    def capture_slot(self, i: int) -> Any:
        return self.host.capture_slot(i)

    def restore_slot(self, i: int, captured: Any) -> None:
        self.host.restore_slot(i, captured)

    def reset_slot(self, i: int, seed: int, indices: torch.Tensor | None = None) -> None:
        self.host.reset_slot(i, seed, indices)

    def resize(self, capacity: int, keep: Sequence[int] | None = None) -> None:
        self.host.resize(capacity, keep)

    def slot_state(self, i: int) -> dict[str, Any] | None:
        return self.host.slot_state(i)

    def load_slot_state(self, i: int, state: dict[str, Any]) -> None:
        self.host.load_slot_state(i, _on_cpu(state))

    def state_dict(self) -> dict[str, Any]:
        return self.host.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.host.load_state_dict(_on_cpu(state))


def _on_cpu(state: Any) -> Any:
    """A stream state with its tensors (generator states) on the CPU, where generators need them.

    A checkpoint loaded with ``map_location=<cuda device>`` puts them on the GPU (``SlotGroup.load`` loads
    on the CPU; a user's own ``load_state_dict`` may not).
    """
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _on_cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_on_cpu(v) for v in state]
    return state
