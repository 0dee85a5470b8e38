"""Per-slot streams over a factory of iterables: for training pipelines that are not random-access.

:class:`~ray_modelbatch.dataset_streams.DatasetStreams` needs ``__getitem__``
to shuffle per slot and to roll a slot back. A pipeline that only iterates (a
generator reading shards, an ``IterableDataset``, a ``DataLoader`` over one)
comes instead as a factory::

    def factory(seed: int, epoch: int):
        g = torch.Generator().manual_seed(seed + epoch)
        return DataLoader(train, batch_size=B, shuffle=True, generator=g, drop_last=True)

    def data():
        return {"train": factory, "val": val_dataset}  # or "val": (x_val, y_val)

:class:`IterableStreams` has the interface of
:class:`~ray_modelbatch.data.PerSlotStreams`, so a stack uses it unchanged.

Why it is built this way:

* **Same batches as a solo run.** Slot ``i`` iterates ``factory(seed_i, 0)``,
  then ``factory(seed_i, 1)`` when that is exhausted, and so on: exactly what
  a one-model loop over ``factory(seed, epoch)`` sees. The factory owns the
  randomness (shuffling, augmentation), seeded from its arguments.
* **Only full batches.** Every step stacks one ``[B, ...]`` batch per slot,
  so a batch whose first dimension is not the stack's ``batch_size`` (the
  last partial batch of an epoch) is skipped, as ``drop_last=True`` would
  drop it (counted in :attr:`IterableStreams.skipped`). An epoch with no full
  batch is an error, not an endless loop.
* **A position is three ints.** An iterator's state cannot be copied in
  general, so a slot's position is ``(seed, epoch, batches taken in the
  epoch)``. ``capture_slot``/``restore_slot`` (run-ahead snapshots and
  rollback) and ``slot_state``/``load_slot_state`` (checkpoints, loadable
  with ``torch.load(weights_only=True)``) carry just that. Restoring is lazy:
  it only sets the position; the next :meth:`IterableStreams.next_batch`
  keeps the open iterator when it is at that position, and otherwise calls
  ``factory(seed, epoch)`` again and skips ``taken`` full batches. That
  replay costs up to one epoch of batch production (reading, decoding,
  augmenting) per restored slot, and it is exact only if the factory gives
  the same batches for the same ``(seed, epoch)``: seed every source of
  randomness from them (a ``DataLoader`` with ``num_workers > 0`` also needs
  its ``generator``, which seeds the workers). Looking at an older state and
  putting the live one back (an export of an earlier boundary) replays
  nothing.
* **Host assembly, one copy per step.** Batches come from the factory on the
  host; the live slots' batches are stacked into one ``[k, B, ...]`` buffer
  (pinned for CUDA) and copied to the stack's device once per step
  (:func:`~ray_modelbatch.host_streams.to_device`).

Parallelism is the factory's: each slot holds its own open iterator, so a
``DataLoader`` with ``num_workers=w`` runs ``w`` worker processes per slot,
restarted every epoch (``persistent_workers`` cannot help, as every epoch is a
new loader). With many slots, few or no workers per loader is usually best.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .data import SlotStreamsState, resized
from .dataset_streams import DatasetInputs, validation_tensors
from .host_streams import expand_skipped, staging, to_device

__all__ = ["IterableStreams", "is_iterable_factory", "iterable_inputs"]

MAX_SKIPPED_IN_A_ROW = 1000  # wrong-sized batches in a row before an (endless?) iterable is called broken

FACTORY = "factory(seed, epoch) -> iterable of (x, y) batches"


def is_iterable_factory(obj: Any) -> bool:
    """Whether ``data()``'s ``"train"`` entry is a factory of iterables: callable, and not a dataset or loader."""
    if not callable(obj) or isinstance(obj, (Dataset, DataLoader, torch.Tensor)):
        return False
    return not (hasattr(obj, "__len__") and hasattr(obj, "__getitem__"))


def _check_iterable(obj: Any, seed: int, epoch: int) -> Any:
    """``obj`` if it can be iterated for batches; one clear line otherwise."""
    if isinstance(obj, (torch.Tensor, str, bytes, Mapping)) or not isinstance(obj, Iterable):
        raise TypeError(f"the training factory returned a {type(obj).__name__} for (seed={seed}, epoch={epoch}), "
                        f"not an iterable of (x, y) batches; it must be {FACTORY} (a generator, a DataLoader, "
                        "a list of batches).")
    return obj


def _xy(item: Any, fields: tuple[Any, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of one batch as host tensors; ``fields`` names them in a dict or a longer tuple."""
    if fields is None:
        fields = ("x", "y") if isinstance(item, Mapping) else (0, 1)
    if not isinstance(item, (Mapping, tuple, list)):
        raise TypeError(f"a batch from the training factory is a {type(item).__name__}; each batch must be "
                        "(x, y), a longer tuple or a dict (pass fields=(x_key, y_key) to name its input and target).")
    try:
        pair = item[fields[0]], item[fields[1]]
    except (KeyError, IndexError, TypeError):
        have = list(item.keys()) if isinstance(item, Mapping) else f"{type(item).__name__} of {len(item)}"
        raise ValueError(f"a batch from the training factory has no fields {fields!r} (it has {have}); give "
                         "(x, y) batches or pass fields=(x_key, y_key).") from None
    out = []
    for name, v in zip(("x", "y"), pair):
        if not isinstance(v, torch.Tensor):
            try:
                v = torch.as_tensor(v)
            except Exception as exc:  # noqa: BLE001 - whatever torch rejects: name it in one line
                raise TypeError(f"a batch's {name} from the training factory is a {type(v).__name__} that "
                                f"torch.as_tensor cannot take ({exc}); batches must be tensors.") from None
        if v.dim() == 0:
            raise ValueError(f"a batch's {name} from the training factory is a scalar; batches need the examples "
                             "on dim 0.")
        out.append(v if v.device.type == "cpu" else v.cpu())
    return out[0], out[1]


@dataclass
class Cursor:
    """An open epoch: the factory's iterable, its iterator and the full batches it has given so far."""

    seed: int
    epoch: int
    taken: int
    iterable: Any
    iterator: Iterator[Any]


class SlotPosition:
    """Where one slot is: ``(seed, epoch, taken)``, plus the iterator that is open, if any.

    The three ints are the slot's state; the cursor is only a cache of an
    iterator that is at that position (or was, before a restore).
    """

    def __init__(self, seed: int, epoch: int = 0, taken: int = 0):
        self.seed, self.epoch, self.taken = int(seed), int(epoch), int(taken)
        self.cursor: Cursor | None = None

    def position(self) -> tuple[int, int, int]:
        return self.seed, self.epoch, self.taken

    def seek(self, position: Sequence[int]) -> None:
        self.seed, self.epoch, self.taken = (int(v) for v in position)

    def cursor_here(self) -> bool:
        c = self.cursor
        return c is not None and (c.seed, c.epoch, c.taken) == self.position()


class IterableStreams(SlotStreamsState):
    """Per-slot streams over ``factory(seed, epoch)`` iterables (``per_slot = True``): a drop-in for PerSlotStreams.

    Args:
        factory: ``factory(seed, epoch) -> iterable of (x, y) batches`` of ``batch_size`` rows, the same
            batches for the same arguments.
        batch_size: rows per slot per step; batches of another size are skipped.
        seeds: one seed per slot (the trial's); its length is the number of slots.
        device: where batches go (the stack's device); default the CPU.
        fields: keys/positions of ``x`` and ``y`` in a batch (default ``(0, 1)`` or ``("x", "y")``).
    """

    per_slot = True

    def __init__(self, factory: Callable[[int, int], Iterable[Any]], batch_size: int, seeds: Sequence[int],
                 device: torch.device | str | None = None, *, fields: tuple[Any, Any] | None = None):
        if not callable(factory):
            raise TypeError(f"factory is a {type(factory).__name__}; give {FACTORY}.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.factory = factory
        self.batch_size = int(batch_size)
        self.fields = None if fields is None else tuple(fields)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.slots: list[SlotPosition | None] = [SlotPosition(s) for s in seeds]
        self.skipped = 0  # batches of another size than batch_size, skipped so far
        self._template: tuple[torch.Tensor, torch.Tensor] | None = None
        self._epoch_steps: int | None | bool = False  # False: not measured yet; None: the iterables have no length

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_slots(self) -> int:
        return len(self.slots)

    @property
    def num_examples(self) -> int | None:
        """Examples one epoch trains on (its full batches times ``batch_size``); None when the length is unknown.

        So ``resolve_steps_per_report("epoch", num_examples, batch_size)`` is
        exactly :meth:`steps_per_epoch`.
        """
        steps = self._measure()
        return None if steps is None else steps * self.batch_size

    # ------------------------------------------------------------ iteration
    def _call(self, seed: int, epoch: int) -> Any:
        return _check_iterable(self.factory(seed, epoch), seed, epoch)

    def _full_steps(self, iterable: Any) -> int | None:
        """Full batches in one epoch of ``iterable``: from ``len()``, None when it has none.

        ``len()`` of a ``DataLoader`` counts a last partial batch unless
        ``drop_last``; the streams skip that batch, so it is not counted here.
        Another sized iterable's ``len()`` is taken as its count of full batches.
        """
        try:
            n = len(iterable)
        except TypeError:
            return None
        if isinstance(iterable, DataLoader) and iterable.batch_size is not None:
            if int(iterable.batch_size) != self.batch_size:
                raise ValueError(f"the training factory's DataLoader has batch_size {iterable.batch_size} but the "
                                 f"stack's is {self.batch_size}; every batch would be skipped, so build the loader "
                                 "with the stack's batch_size.")
            if not iterable.drop_last:
                try:
                    rows = len(iterable.dataset) if isinstance(iterable.dataset, IterableDataset) else \
                        len(iterable.sampler)
                except TypeError:
                    return int(n)
                return rows // self.batch_size
        return int(n)

    def _measure(self) -> int | None:
        """Full batches per epoch of the first slot's stream (or seed 0), measured once."""
        if self._epoch_steps is False:
            first = next((s for s in self.slots if s is not None), None)
            self._epoch_steps = self._full_steps(self._call(first.seed if first else 0, 0))
        return self._epoch_steps  # type: ignore[return-value]

    def steps_per_epoch(self, slot: int | None = None) -> int:
        """Steps in one epoch: full batches per ``len()`` of the factory's iterable.

        ``slot=None``: an epoch of the first slot's seed (every epoch is taken
        to be as long); ``slot``: that slot's current epoch. Raises a clear
        error when the iterables have no length (a generator): give
        ``steps_per_report`` as an int then.
        """
        if slot is None:
            steps = self._measure()
        else:
            s = self._slot(slot)
            c = s.cursor
            iterable = c.iterable if c is not None and (c.seed, c.epoch) == (s.seed, s.epoch) else \
                self._call(s.seed, s.epoch)
            steps = self._full_steps(iterable)
        if steps is None:
            raise TypeError("steps_per_report=\"epoch\" needs the length of an epoch, but the training factory's "
                            "iterables have no len() (a generator or an unsized IterableDataset); give "
                            "steps_per_report as an int, or return a sized iterable (a DataLoader over a Dataset).")
        return steps

    def _pull(self, cursor: Cursor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cursor's next full batch, or None at the end of its epoch; wrong-sized batches are skipped."""
        in_a_row = 0
        for item in cursor.iterator:
            x, y = _xy(item, self.fields)
            if x.shape[0] != self.batch_size:
                self.skipped += 1
                in_a_row += 1
                if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise ValueError(f"the training factory gave {in_a_row} batches in a row of {x.shape[0]} rows, "
                                     f"none of batch_size {self.batch_size}; make its batches batch_size rows.")
                continue
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"a batch from the training factory has {x.shape[0]} rows of x but {y.shape[0]} "
                                 "of y; give one target per example.")
            cursor.taken += 1
            return x, y
        return None

    def _open(self, seed: int, epoch: int, taken: int) -> Cursor:
        """A new iterator of ``factory(seed, epoch)`` with its first ``taken`` full batches skipped (the replay)."""
        iterable = self._call(seed, epoch)
        cursor = Cursor(seed, epoch, 0, iterable, iter(iterable))
        while cursor.taken < taken:
            if self._pull(cursor) is None:
                raise ValueError(f"replaying the training factory at (seed={seed}, epoch={epoch}) gave "
                                 f"{cursor.taken} full batches, but the slot was at batch {taken}; the factory "
                                 "must give the same batches for the same (seed, epoch) (seed its shuffling and "
                                 "augmentation from them).")
        return cursor

    def _draw(self, s: SlotPosition) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ``s``'s next full batch, starting its next epoch when the current one is exhausted."""
        if not s.cursor_here():
            s.cursor = self._open(*s.position())
        got = self._pull(s.cursor)
        if got is None:
            cursor = self._open(s.seed, s.epoch + 1, 0)
            got = self._pull(cursor)
            if got is None:
                raise ValueError(f"the training factory gave no batch of batch_size {self.batch_size} rows at "
                                 f"(seed={s.seed}, epoch={s.epoch + 1}) ({self.skipped} wrong-sized batches "
                                 "skipped so far); its batches must have the stack's batch_size rows.")
            s.cursor = cursor
        s.epoch, s.taken = s.cursor.epoch, s.cursor.taken
        return got

    def _slot(self, i: int) -> SlotPosition:
        s = self.slots[i]
        if s is None:
            raise RuntimeError(f"slot {i} has no data stream yet; call reset_slot({i}, seed) first")
        return s

    def next_batch(self, slots: Sequence[int] | torch.Tensor,
                   skip: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batches of the named slots, ``(xb [n, B, ...], yb [n, B, ...])`` on the device, aligned with ``slots``.

        Only the live slots advance; skipped slots (``skip[j]``) stay where
        they are and get the first live slot's rows. If the factory or a
        batch raises, every slot is put back where it was before the call.
        """
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        slots = [int(i) for i in slots]
        n = len(slots)
        live = [j for j in range(n) if skip is None or not skip[j]]
        if not live:
            return self._filler(n)
        positions = [self._slot(slots[j]) for j in live]
        before = [p.position() for p in positions]
        try:
            batches = [self._draw(p) for p in positions]
        except BaseException:
            for p, b in zip(positions, before):
                p.seek(b)
                p.cursor = None  # an iterator that raised may be part-way through a batch
            raise
        xb, yb = (self._stack([b[k] for b in batches], name) for k, name in ((0, "x"), (1, "y")))
        if self._template is None:
            self._template = (xb[:1].clone(), yb[:1].clone())
        return expand_skipped(xb, live, n), expand_skipped(yb, live, n)

    def _stack(self, batches: list[torch.Tensor], what: str) -> torch.Tensor:
        """The slots' ``[B, ...]`` batches as one ``[k, B, ...]`` tensor on the device (one host-to-device copy)."""
        first = batches[0]
        bad = next((b for b in batches if b.shape != first.shape or b.dtype != first.dtype), None)
        if bad is not None:
            raise ValueError(f"the slots' batches of {what} differ: {tuple(first.shape)} {first.dtype} and "
                             f"{tuple(bad.shape)} {bad.dtype}; the factory must give every batch one shape and dtype.")
        out = staging((len(batches), *first.shape), first.dtype, self._device)
        torch.stack(batches, out=out)
        return to_device(out, self._device)

    def _filler(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` copies of a fixed batch (the first one drawn, else one from a fresh iterable): no slot runs."""
        if self._template is None:
            first = next((s for s in self.slots if s is not None), None)
            got = self._pull(self._open(first.seed if first else 0, 0, 0))
            if got is None:
                raise ValueError(f"the training factory gave no batch of batch_size {self.batch_size} rows; its "
                                 "batches must have the stack's batch_size rows.")
            self._template = (self._stack([got[0]], "x"), self._stack([got[1]], "y"))
        zeros = torch.zeros(n, dtype=torch.long, device=self._device)
        return self._template[0].index_select(0, zeros), self._template[1].index_select(0, zeros)

    # ------------------------------------------------------------ per-slot protocol
    def capture_slot(self, i: int) -> tuple[int, int, int] | None:
        """Slot ``i``'s position ``(seed, epoch, taken)`` for :meth:`restore_slot`: a run-ahead snapshot."""
        s = self.slots[i]
        return None if s is None else s.position()

    def restore_slot(self, i: int, captured: tuple[int, int, int] | None) -> None:
        """Go back (or forward) to a captured position; the iterator is rebuilt lazily, only if it is elsewhere."""
        s = self.slots[i]
        if s is not None and captured is not None:
            s.seek(captured)

    def reset_slot(self, i: int, seed: int, indices: torch.Tensor | None = None) -> None:
        """Give slot ``i`` a new stream from epoch 0 of ``seed`` (a new trial in a freed slot)."""
        if indices is not None:
            raise ValueError("a factory of iterables has no row numbers to select; split the data inside "
                             "factory(seed, epoch) instead of passing indices.")
        self.slots[i] = SlotPosition(int(seed))

    def resize(self, capacity: int, keep: Sequence[int] | None = None) -> None:
        """Follow :meth:`ModelBatch.resize`: new slot ``j`` keeps old slot ``keep[j]``'s stream (and iterator)."""
        self.slots = resized(self.slots, capacity, keep)

    def slot_state(self, i: int) -> dict[str, int] | None:
        """Slot ``i``'s position as plain ints (a checkpoint loads with ``torch.load(weights_only=True)``)."""
        s = self.slots[i]
        if s is None:
            return None
        return {"seed": s.seed, "epoch": s.epoch, "taken": s.taken, "batch_size": self.batch_size}

    def load_slot_state(self, i: int, state: Mapping[str, Any]) -> None:
        """Resume slot ``i`` from :meth:`slot_state`; the factory is replayed to the position on the next step."""
        s = self.slots[i]
        if s is None:
            raise RuntimeError(f"slot {i} has no data stream; call reset_slot first, then load its state")
        if not {"seed", "epoch", "taken"} <= set(state):
            raise ValueError(f"not an iterable stream state (keys {sorted(state)}); it was saved by another kind of "
                             "stream, so it cannot resume a factory-of-iterables slot.")
        if int(state.get("batch_size", self.batch_size)) != self.batch_size:
            raise ValueError(f"stream state was saved with batch_size {int(state['batch_size'])}, these streams have "
                             f"{self.batch_size}; batches taken would not mean the same rows.")
        s.seek((state["seed"], state["epoch"], state["taken"]))

    def close(self) -> None:
        """Drop every open iterator (a DataLoader's workers stop with it)."""
        for s in self.slots:
            if s is not None:
                s.cursor = None


# --------------------------------------------------------------- data() form
def iterable_inputs(factory: Any, val: Any, fields: tuple[Any, Any] | None = None,
                    device: torch.device | str = "cpu") -> DatasetInputs:
    """Check ``{"train": factory, "val": ...}`` and materialize the validation set on ``device``.

    ``factory(0, 0)`` is called and its first batch read once, to check that
    it is an iterable of ``(x, y)`` batches whose ``x`` matches the
    validation rows (a ``DataLoader`` with workers starts them for that).
    """
    dev = torch.device(device)
    try:
        inspect.signature(factory).bind(0, 0)
    except TypeError as exc:
        raise TypeError(f"data()['train'] is a callable that cannot be called as factory(seed, epoch) ({exc}); it "
                        f"must be {FACTORY}.") from None
    except ValueError:  # no signature to inspect (a builtin): let the call tell
        pass
    x_val, y_val = validation_tensors(val, None if fields is None else tuple(fields), dev)
    iterable = _check_iterable(factory(0, 0), 0, 0)
    iterator = iter(iterable)
    try:
        first = next(iterator, None)
        if first is None:
            raise ValueError("data()['train'](0, 0) gave no batch; the factory's iterables must give (x, y) "
                             "batches of the stack's batch_size.")
        x0, _ = _xy(first, None if fields is None else tuple(fields))
    finally:
        close = getattr(iterator, "close", None)  # a generator: run its cleanup now, not at garbage collection
        if callable(close):
            close()
    if x0.shape[1:] != x_val.shape[1:]:
        raise ValueError(f"data(): training batches have x rows of shape {tuple(x0.shape[1:])} but validation rows "
                         f"{tuple(x_val.shape[1:])}; give both the same features.")
    return DatasetInputs(factory, x_val, y_val, None, None if fields is None else tuple(fields), iterable=True)
