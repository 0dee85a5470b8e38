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

Batches may be dicts of keyword inputs with the labels among them, as a
``DataLoader`` over a tokenized Hugging Face dataset yields them
(``{"input_ids": ..., "attention_mask": ..., "labels": ...}``): without
``fields``, a dict batch with a ``"labels"`` key (the keyword transformers
models take) and no ``"x"``/``"y"`` is the model's whole input, so ``x`` is
that dict and there is no separate target (``y`` is None), exactly as
:mod:`~ray_modelbatch.dataset_streams` treats dict examples. Every column is
a tensor with the examples on dim 0 and all columns must have the same number
of rows; a step's ``x`` is then a dict of ``[k, B, ...]`` columns (see
:mod:`ray_modelbatch.inputs`). The slots' batches are stacked column by
column, so each column needs one shape in every batch: pad tokenized text to
a fixed length (``padding="max_length"``), not to each batch's longest row.
With ``fields=(x_key, y_key)`` a dict batch is split into input and target
as before. A position is the same three ints in either form, so checkpoints
and replay do not depend on it.

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

from . import inputs
from .data import SlotStreamsState, resized
from .dataset_streams import DatasetInputs, validation_tensors
from .host_streams import expand_skipped, staging, to_device

__all__ = ["IterableStreams", "is_iterable_factory", "iterable_inputs"]

MAX_SKIPPED_IN_A_ROW = 1000  # wrong-sized batches in a row before an (endless?) iterable is called broken

FACTORY = "factory(seed, epoch) -> iterable of (x, y) batches (or dict batches with a 'labels' column)"
BATCH_FORMS = ("(x, y), a longer tuple, a dict with 'x' and 'y', or a dict of keyword tensors with a 'labels' "
               "column (input_ids, attention_mask, labels)")


def is_iterable_factory(obj: Any) -> bool:
    """Whether ``data()``'s ``"train"`` entry is a factory of iterables: callable, and not a dataset or loader."""
    if not callable(obj) or isinstance(obj, (Dataset, DataLoader, torch.Tensor)):
        return False
    return not (hasattr(obj, "__len__") and hasattr(obj, "__getitem__"))


def _check_iterable(obj: Any, seed: int, epoch: int) -> Any:
    """``obj`` if it can be iterated for batches; one clear line otherwise."""
    if isinstance(obj, (torch.Tensor, str, bytes, Mapping)) or not isinstance(obj, Iterable):
        raise TypeError(f"the training factory returned a {type(obj).__name__} for (seed={seed}, epoch={epoch}), "
                        f"not an iterable of batches; it must be {FACTORY} (a generator, a DataLoader, "
                        "a list of batches).")
    return obj


def _keyword_batch(item: Any, fields: tuple[Any, Any] | None) -> bool:
    """Whether ``item`` is keyword inputs with its labels inside (the rule of ``dataset_streams.pick``).

    Only without ``fields``: naming fields always means the old split into
    input and target, so a dict that happens to have ``"labels"`` keeps working.
    """
    return fields is None and isinstance(item, Mapping) and "labels" in item and not ("x" in item or "y" in item)


def _host_tensor(v: Any, name: str) -> torch.Tensor:
    """One field or column as a host tensor with the examples on dim 0; one clear line otherwise."""
    if not isinstance(v, torch.Tensor):
        try:
            v = torch.as_tensor(v)
        except Exception as exc:  # noqa: BLE001 - whatever torch rejects: name it in one line
            raise TypeError(f"a batch's {name} from the training factory is a {type(v).__name__} that "
                            f"torch.as_tensor cannot take ({exc}); batches must be tensors.") from None
    if v.dim() == 0:
        raise ValueError(f"a batch's {name} from the training factory is a scalar; batches need the examples "
                         "on dim 0.")
    return v if v.device.type == "cpu" else v.cpu()


def _host_input(v: Any, name: str) -> Any:
    """A batch's ``x`` (a tensor, or a dict of columns as a plain dict) or ``y`` as host tensors."""
    if inputs.is_columns(v):
        if not v:
            raise ValueError(f"a batch's {name} from the training factory is an empty dict; give at least one "
                             "column (e.g. 'input_ids').")
        return {k: _host_tensor(c, f"{name}[{k!r}]") for k, c in v.items()}
    return _host_tensor(v, name)


def _rows(x: Any, what: str = "x") -> int:
    """Rows of a batch's ``x``: every column of a dict must have as many as the first (named if not)."""
    if not inputs.is_columns(x):
        return int(x.shape[0])
    (first, n), *others = ((k, int(v.shape[0])) for k, v in x.items())
    bad = next(((k, m) for k, m in others if m != n), None)
    if bad is not None:
        raise ValueError(f"a dict batch from the training factory has {bad[1]} rows in its column {bad[0]!r} but "
                         f"{n} in {first!r} ({what} = {inputs.describe(x)}); every column needs one row per "
                         "example (pad or truncate all columns together).")
    return n


def _xy(item: Any, fields: tuple[Any, Any] | None) -> tuple[Any, torch.Tensor | None]:
    """``(x, y)`` of one batch as host tensors; ``fields`` names them in a dict or a longer tuple.

    A dict batch with ``"labels"`` and no ``"x"``/``"y"`` (no ``fields``) is
    ``(dict of columns, None)``; ``x`` may also be a dict of columns under
    ``fields``. The columns' row counts are checked here, for every batch, so a
    malformed batch is named even when its size would have it skipped.
    """
    if _keyword_batch(item, fields):
        x = _host_input(item, "x")
        _rows(x)
        return x, None
    if fields is None:
        fields = ("x", "y") if isinstance(item, Mapping) else (0, 1)
    if not isinstance(item, (Mapping, tuple, list)):
        raise TypeError(f"a batch from the training factory is a {type(item).__name__}; each batch must be "
                        f"{BATCH_FORMS} (pass fields=(x_key, y_key) to name its input and target).")
    try:
        x, y = item[fields[0]], item[fields[1]]
    except (KeyError, IndexError, TypeError):
        have = list(item.keys()) if isinstance(item, Mapping) else f"{type(item).__name__} of {len(item)}"
        raise ValueError(f"a batch from the training factory has no fields {fields!r} (it has {have}); give "
                         "(x, y) batches, pass fields=(x_key, y_key), or call a dict batch's label column 'labels' "
                         "to give the whole dict to the model as keyword inputs (model(**batch)).") from None
    x = _host_input(x, "x")
    _rows(x)
    return x, _host_tensor(y, "y")


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
            batches for the same arguments; or of dict batches of keyword tensors with a ``"labels"`` column
            (then ``x`` is the dict and ``y`` None).
        batch_size: rows per slot per step; batches of another size are skipped.
        seeds: one seed per slot (the trial's); its length is the number of slots.
        device: where batches go (the stack's device); default the CPU.
        fields: keys/positions of ``x`` and ``y`` in a batch (default ``(0, 1)``, ``("x", "y")``, or the whole
            dict as ``x`` when it has ``"labels"``).
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
        self._template: tuple[Any, Any] | None = None  # one slot's stacked batch, for steps where none runs
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

    def _pull(self, cursor: Cursor) -> tuple[Any, torch.Tensor | None] | None:
        """The cursor's next full batch, or None at the end of its epoch; wrong-sized batches are skipped."""
        in_a_row = 0
        for item in cursor.iterator:
            x, y = _xy(item, self.fields)
            n = _rows(x)
            if n != self.batch_size:
                self.skipped += 1
                in_a_row += 1
                if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                    raise ValueError(f"the training factory gave {in_a_row} batches in a row of {n} rows, "
                                     f"none of batch_size {self.batch_size}; make its batches batch_size rows.")
                continue
            if y is not None and y.shape[0] != n:
                raise ValueError(f"a batch from the training factory has {n} rows of x but {y.shape[0]} "
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

    def _draw(self, s: SlotPosition) -> tuple[Any, torch.Tensor | None]:
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
                   skip: Sequence[bool] | None = None) -> tuple[Any, Any]:
        """Batches of the named slots, ``(xb [n, B, ...], yb [n, B, ...])`` on the device, aligned with ``slots``.

        For dict batches ``xb`` is a dict of ``[n, B, ...]`` columns and ``yb``
        is None. Only the live slots advance; skipped slots (``skip[j]``) stay where
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
            self._template = tuple(inputs.apply(lambda t: t[:1].clone(), v) for v in (xb, yb))
        spread = lambda t: expand_skipped(t, live, n)  # noqa: E731
        return inputs.apply(spread, xb), inputs.apply(spread, yb)

    def _stack(self, batches: list[Any], what: str) -> Any:
        """The slots' batches of ``what`` stacked on the device: a tensor, a dict of columns, or None.

        Every slot must give the same form (a step is one computation), so a
        mix of dict and tensor batches, or of columns, is named in one line.
        """
        forms = {"None" if b is None else "dict" if inputs.is_columns(b) else "tensor" for b in batches}
        if len(forms) > 1:
            raise ValueError(f"the slots' batches of {what} differ in form ({' and '.join(sorted(forms))}); the "
                             "factory must give every batch in one form, (x, y) or a dict with 'labels'.")
        first = batches[0]
        if first is None:
            return None
        if inputs.is_columns(first):
            bad = next((b for b in batches if set(b) != set(first)), None)
            if bad is not None:
                raise ValueError(f"the slots' dict batches have different columns ({sorted(first)} and "
                                 f"{sorted(bad)}); the factory must give every batch the same columns.")
            return {k: self._stack_tensors([b[k] for b in batches], f"{what}[{k!r}]") for k in first}
        return self._stack_tensors(batches, what)

    def _stack_tensors(self, batches: list[torch.Tensor], what: str) -> torch.Tensor:
        """The slots' ``[B, ...]`` tensors as one ``[k, B, ...]`` tensor on the device (one host-to-device copy)."""
        first = batches[0]
        bad = next((b for b in batches if b.shape != first.shape or b.dtype != first.dtype), None)
        if bad is not None:
            pad = " (pad tokenized columns to one length: padding='max_length')" if "[" in what else ""
            raise ValueError(f"the slots' batches of {what} differ: {tuple(first.shape)} {first.dtype} and "
                             f"{tuple(bad.shape)} {bad.dtype}; the factory must give every batch one shape and "
                             f"dtype{pad}.")
        out = staging((len(batches), *first.shape), first.dtype, self._device)
        torch.stack(batches, out=out)
        return to_device(out, self._device)

    def _filler(self, n: int) -> tuple[Any, Any]:
        """``n`` copies of a fixed batch (the first one drawn, else one from a fresh iterable): no slot runs."""
        if self._template is None:
            first = next((s for s in self.slots if s is not None), None)
            got = self._pull(self._open(first.seed if first else 0, 0, 0))
            if got is None:
                raise ValueError(f"the training factory gave no batch of batch_size {self.batch_size} rows; its "
                                 "batches must have the stack's batch_size rows.")
            self._template = (self._stack([got[0]], "x"), self._stack([got[1]], "y"))
        zeros = torch.zeros(n, dtype=torch.long, device=self._device)
        return tuple(inputs.apply(lambda t: t.index_select(0, zeros), v) for v in self._template)

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
    it is an iterable of ``(x, y)`` (or dict) batches whose ``x`` matches the
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
                             "or dict batches of the stack's batch_size.")
        x0, y0 = _xy(first, None if fields is None else tuple(fields))
    finally:
        close = getattr(iterator, "close", None)  # a generator: run its cleanup now, not at garbage collection
        if callable(close):
            close()
    _check_against_validation(x0, y0, x_val, y_val)
    return DatasetInputs(factory, x_val, y_val, None, None if fields is None else tuple(fields), iterable=True)


def _check_against_validation(x0: Any, y0: Any, x_val: Any, y_val: Any) -> None:
    """One clear line unless training batches and validation rows have one form (tensor or the same columns).

    Evaluation runs the same model call on the validation rows, so a dict
    training batch needs dict validation rows with the same keys (and no
    separate target), and a tensor ``x`` the same features per row.
    """
    if inputs.is_columns(x0) or inputs.is_columns(x_val) or (y0 is None) != (y_val is None):
        if not (inputs.is_columns(x0) and inputs.is_columns(x_val)) or set(x0) != set(x_val) \
                or (y0 is None) != (y_val is None):
            raise ValueError(f"data(): training batches give x {inputs.describe(x0)} and y {inputs.describe(y0)} "
                             f"but the validation set {inputs.describe(x_val)} and {inputs.describe(y_val)}; give "
                             "both in the same form (the same columns).")
    elif x0.shape[1:] != x_val.shape[1:]:
        raise ValueError(f"data(): training batches have x rows of shape {tuple(x0.shape[1:])} but validation rows "
                         f"{tuple(x_val.shape[1:])}; give both the same features.")
