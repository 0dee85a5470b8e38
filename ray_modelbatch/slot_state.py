"""The per-slot protocol, and the run-ahead snapshots built on it.

A slot's training state is spread over a few objects: the weights and buffers
(:class:`~ray_modelbatch.ModelBatch`), the optimizer's moments and step counts,
a loss scaler's scales, and the slot's data stream. Each of them keeps its
per-slot state in tensors whose first dimension is the slot, and says which
through one method::

    slot_tensors() -> {name: tensor [S, ...]}

Python-side per-slot state (a data stream's position) is reached through
``capture_slot(i)`` / ``restore_slot(i, captured)``. That is the whole
protocol a per-slot component implements besides the export/import of one
slot (``slot_state`` / ``load_slot_state``) and the resize/reset hooks of
:meth:`ModelBatch.attach`. A new per-slot feature (EMA weights, say) adds its
tensors to ``slot_tensors`` and is snapshotted, rolled back and moved with
everything else without touching this file.

:class:`SlotSnapshots` keeps, for every slot, the state at its last few
iteration boundaries, so that a host can let a slot train ahead of the
results Tune has taken and still hand Tune, on a save, exactly the state at
the boundary Tune knows about. Capturing is one ``index_copy_`` per tensor
for all the slots that reach a boundary in the same fused step, never a
per-slot copy loop.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Protocol, Sequence

import torch


class SlotStateful(Protocol):
    """An object holding per-slot tensors (the ModelBatch, an optimizer, a loss scaler)."""

    def slot_tensors(self) -> dict[str, torch.Tensor]: ...


class SlotPythonState(Protocol):
    """An object holding per-slot Python state (per-slot data streams)."""

    def capture_slot(self, i: int) -> Any: ...

    def restore_slot(self, i: int, captured: Any) -> None: ...


def collect_tensors(components: Iterable[Any]) -> dict[str, torch.Tensor]:
    """The per-slot tensors of every component that has some, by their (unique) names."""
    out: dict[str, torch.Tensor] = {}
    for c in components:
        if c is not None and hasattr(c, "slot_tensors"):
            out.update(c.slot_tensors())
    return out


class SlotSnapshots:
    """A ring of ``depth`` saved states per slot: position ``p`` of slot ``s`` is row ``p * S + s``.

    The ring follows the stack's size (:meth:`resize`). Tensors that appear
    after a capture (state an optimizer allocates lazily) restore as zeros,
    which is what they were then.
    """

    def __init__(self, depth: int, capacity: int):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth, self.capacity = int(depth), int(capacity)
        self._ring: dict[str, torch.Tensor] = {}
        self._python: dict[tuple[int, int], list[Any]] = {}  # (slot, position) -> captured values

    def _rows(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return positions * self.capacity + slots

    def capture(self, tensors: Mapping[str, torch.Tensor], python: Sequence[Any], slots: Sequence[int],
                positions: Sequence[int]) -> None:
        """Save the current state of ``slots`` into their ring ``positions`` (one copy per tensor)."""
        if not slots:
            return
        index: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # (slots, ring rows) per device
        for name, t in tensors.items():
            if t.device not in index:
                dev_slots = torch.as_tensor(list(slots), dtype=torch.long, device=t.device)
                pos = torch.as_tensor(list(positions), dtype=torch.long, device=t.device)
                index[t.device] = (dev_slots, self._rows(dev_slots, pos))
            dev_slots, rows = index[t.device]
            ring = self._ring.get(name)
            if ring is None or ring.dtype != t.dtype or ring.shape[1:] != t.shape[1:]:
                ring = self._ring[name] = torch.zeros((self.depth * self.capacity, *t.shape[1:]), dtype=t.dtype,
                                                      device=t.device)
            ring.index_copy_(0, rows, t.index_select(0, dev_slots))
        for s, p in zip(slots, positions):
            self._python[(int(s), int(p))] = [c.capture_slot(int(s)) for c in python]

    @torch.no_grad()
    def restore(self, tensors: Mapping[str, torch.Tensor], python: Sequence[Any], slot: int, position: int) -> None:
        """Put ``slot`` back to the state saved at ``position``."""
        row = int(position) * self.capacity + int(slot)
        for name, t in tensors.items():
            ring = self._ring.get(name)
            if ring is None:
                t[slot].zero_()
            else:
                t[slot].copy_(ring[row])
        saved = self._python.get((int(slot), int(position)))
        if saved is not None:
            for c, value in zip(python, saved):
                c.restore_slot(int(slot), value)

    def live_copy(self, tensors: Mapping[str, torch.Tensor], python: Sequence[Any], slot: int) -> tuple:
        """The slot's current state, for :meth:`put_back` (used to look at an older state for a moment)."""
        return ({k: t[slot].clone() for k, t in tensors.items()}, [c.capture_slot(int(slot)) for c in python])

    @staticmethod
    @torch.no_grad()
    def put_back(tensors: Mapping[str, torch.Tensor], python: Sequence[Any], slot: int, copy: tuple) -> None:
        values, py = copy
        for k, t in tensors.items():
            if k in values:
                t[slot].copy_(values[k])
        for c, value in zip(python, py):
            c.restore_slot(int(slot), value)

    def forget(self, slot: int) -> None:
        """Drop a freed slot's Python-side captures (its tensors are simply overwritten later)."""
        for p in range(self.depth):
            self._python.pop((int(slot), p), None)

    def resize(self, keep: Sequence[int], capacity: int) -> None:
        """Follow the stack: new slot ``j`` keeps old slot ``keep[j]``'s saved states."""
        old = self.capacity
        src = torch.tensor([p * old + k for p in range(self.depth) for k in keep], dtype=torch.long)
        dst = torch.tensor([p * capacity + j for p in range(self.depth) for j in range(len(keep))], dtype=torch.long)
        for name, ring in list(self._ring.items()):
            out = torch.zeros((self.depth * capacity, *ring.shape[1:]), dtype=ring.dtype, device=ring.device)
            out.index_copy_(0, dst.to(ring.device), ring.index_select(0, src.to(ring.device)))
            self._ring[name] = out
        self._python = {(j, p): self._python[(k, p)] for j, k in enumerate(keep) for p in range(self.depth)
                        if (k, p) in self._python}
        self.capacity = int(capacity)

    def nbytes(self) -> int:
        """Memory the ring holds (what run-ahead costs on top of the stack itself)."""
        return sum(t.numel() * t.element_size() for t in self._ring.values())
