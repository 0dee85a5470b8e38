"""Data feeding and routing for fused training, pure torch and on the batch's device.

Two ways to feed a :class:`~ray_modelbatch.ModelBatch`:

* :class:`SharedStream`: every active slot sees the same batch. This is the
  cheapest (the input is read once) and is what a hyperparameter sweep over
  one data set usually wants.
* :class:`PerSlotStreams`: every slot has its own :class:`SlotSampler` (own
  seed, own subset of rows), so slot ``i`` sees exactly the batches a model
  trained alone would see with ``SlotSampler(indices_i, batch_size, seed_i)``.
  That is what makes a fused run reproduce independent training, and what
  bagging (:func:`bootstrap`), k-fold cross-validation (:func:`kfold`) and
  sharding (:func:`shards`) need.

Data stays on the device: a step builds one ``[n, B]`` index tensor for the
``n`` slots that run and gathers ``x``/``y`` with it (every column, when ``x`` is
a dict of keyword inputs such as ``{"input_ids": ..., "attention_mask": ...}``;
``y`` is None when the labels are one of them, see :mod:`ray_modelbatch.inputs`), so there is no host
round trip and no Python loop over examples. Only the samplers of the slots
that run advance, so a slot that is paused (early stopping, a Ray Tune trial
on hold) resumes where it left off.

Nothing here imports Ray: the standalone :class:`~ray_modelbatch.trainer.Trainer`
and a Ray Tune slot host use the same streams.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch

from . import inputs

__all__ = [
    "SlotSampler",
    "SharedStream",
    "PerSlotStreams",
    "bootstrap",
    "kfold",
    "shards",
    "padded_per_slot",
    "sweep_data",
    "sweep_inputs",
    "resolve_steps_per_report",
]


def _as_index(indices: Any, device: torch.device | str | None = None) -> torch.Tensor:
    idx = torch.as_tensor(indices)
    if idx.dtype == torch.bool:
        idx = idx.nonzero().flatten()
    if idx.dtype != torch.long:
        if idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"indices must be integers (a LongTensor of row numbers), got dtype {idx.dtype}")
        idx = idx.long()
    if idx.dim() != 1:
        raise ValueError(f"indices must be a 1-D tensor of row numbers, got shape {list(idx.shape)}")
    return idx if device is None else idx.to(device)


def check_batch_size(batch_size: Any) -> int:
    """A batch size as an int >= 1, or one line on what was given: every slot of a stack steps one batch
    size (slots of other batch sizes train in stacks of their own: one ModelBatch, or one Tune stack, each)."""
    if isinstance(batch_size, (list, tuple)) or (isinstance(batch_size, torch.Tensor) and batch_size.numel() > 1):
        raise TypeError(f"batch_size must be one number for every slot of a stack, got {batch_size!r}: slots of "
                        "other batch sizes train in a ModelBatch of their own (a Tune sweep that searches the batch "
                        "size makes one stack per size by itself)")
    if isinstance(batch_size, bool) or not float(batch_size).is_integer() or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    return int(batch_size)


class SlotSampler:
    """Infinite stream of index batches for one slot (or one plain model).

    Each epoch is a fresh permutation of ``indices`` drawn from this sampler's
    own CPU ``torch.Generator`` seeded with ``seed``, cut into batches of exactly
    ``batch_size`` rows; the incomplete batch at the end of an epoch is dropped,
    so every step has the same shape (no recompilation, equal weight per step).

    The permutation is drawn on the CPU so that a stream is the same on every
    device (a checkpoint taken on a GPU resumes identically on a CPU), and
    copied to ``indices.device`` once per epoch; batches are slices of it.

    Use it standalone to train one plain model on exactly the batches slot
    ``i`` of a :class:`PerSlotStreams` sees::

        sampler = SlotSampler(indices_i, batch_size, seed_i)
        for _ in range(steps):
            b = next(sampler)
            loss = loss_fn(model(x[b]), y[b])
    """

    def __init__(self, indices: torch.Tensor, batch_size: int, seed: int):
        indices = _as_index(indices)
        batch_size = check_batch_size(batch_size)
        if indices.numel() < batch_size:
            raise ValueError(
                f"a slot has {indices.numel()} rows but batch_size is {batch_size}; every batch must be full "
                "(the last incomplete batch of an epoch is dropped), so give the slot more rows or use a "
                "smaller batch_size."
            )
        self.indices = indices
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self.epoch = -1
        self.position = 0
        self._epoch_start_state: torch.Tensor | None = None
        self._perm: torch.Tensor | None = None
        self._batches: tuple[torch.Tensor, ...] | None = None  # _perm's batches as views, made once an epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.indices.numel() // self.batch_size

    def _new_epoch(self) -> None:
        self._epoch_start_state = self.generator.get_state()
        perm = torch.randperm(self.indices.numel(), generator=self.generator)
        self._perm, self._batches = self._place(perm), None
        self.epoch += 1
        self.position = 0

    def _place(self, perm: torch.Tensor) -> torch.Tensor:
        """Rows of this epoch in order, on the indices' device (one copy per epoch)."""
        dev = self.indices.device
        if dev.type == "cuda":
            # Pinned + non_blocking keeps the copy from synchronizing the host
            # with the GPU; the caching host allocator keeps the buffer alive.
            perm = perm.pin_memory().to(dev, non_blocking=True)
        elif dev.type != "cpu":
            perm = perm.to(dev)
        return self.indices.index_select(0, perm)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self._perm is None or self.position + self.batch_size > self._perm.numel():
            self._new_epoch()
        start = self.position
        self.position += self.batch_size
        if start % self.batch_size:  # (never, unless a position was set by hand)
            return self._perm[start : self.position]
        if self._batches is None:  # one op an epoch instead of a slice every step (a fused step reads S batches)
            whole = self.batches_per_epoch * self.batch_size
            self._batches = self._perm[:whole].view(-1, self.batch_size).unbind(0)
        return self._batches[start // self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: seed, epoch, position in the epoch and the generator state that drew it.

        The indices themselves are not included (they are part of the data
        routing, which is rebuilt from its own seed); ``load_state_dict``
        checks the count.
        """
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_indices": int(self.indices.numel()),
            "epoch": self.epoch,
            "position": self.position,
            "epoch_start_state": None if self._epoch_start_state is None else self._epoch_start_state.clone(),
            "generator_state": self.generator.get_state(),
        }

    def capture(self) -> tuple:
        """Where the stream is, by reference (the generator state is copied): see :meth:`restore`."""
        return (self.seed, self.epoch, self.position, self._perm, self._epoch_start_state, self.generator.get_state())

    def restore(self, captured: tuple) -> None:
        """Go back to where :meth:`capture` was taken; the next batches are the ones that followed it then."""
        self.seed, self.epoch, self.position, self._perm, self._epoch_start_state, gen = captured
        self._batches = None
        self.generator.set_state(gen)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the stream where :meth:`state_dict` left it (same indices required).

        With the batch size it was saved with, exactly. With another (a trial
        whose PBT explore changed ``batch_size`` loads its donor's state), the
        same epoch's permutation goes on from the same row, in batches of this
        sampler's size; an epoch whose full batches the saver had taken is over,
        so the next batch starts a new one, as it would have for the saver.
        """
        if int(state["num_indices"]) != self.indices.numel():
            raise ValueError(
                f"sampler state was saved for {state['num_indices']} rows, this sampler has "
                f"{self.indices.numel()}; rebuild it with the same indices before loading."
            )
        saved_batch = int(state["batch_size"])
        position = int(state["position"])
        if saved_batch != self.batch_size and position + saved_batch > self.indices.numel():
            position = self.indices.numel()  # the saver's epoch is over: a new one at the next batch
        self.seed = int(state["seed"])
        if state["epoch_start_state"] is None:
            self.generator.set_state(state["generator_state"])
            self._perm, self._epoch_start_state, self._batches = None, None, None
            self.epoch, self.position = int(state["epoch"]), position
            return
        # Redraw the current epoch's permutation instead of storing it.
        self.generator.set_state(state["epoch_start_state"])
        self.epoch = int(state["epoch"]) - 1
        self._new_epoch()
        self.position = position


class SharedStream:
    """One batch per step, shared by every slot that runs (``per_slot = False``).

    Args:
        x, y: the whole training set (tensors with rows on dim 0, or dicts of
            such columns; ``y`` may be None); kept on ``device`` (default: where ``x`` is).
        batch_size: rows per step.
        seed: seed of the shuffling generator.
    """

    per_slot = False

    def __init__(self, x: Any, y: Any, batch_size: int, seed: int = 0,
                 device: torch.device | str | None = None):
        rows = _check_rows(x, y)
        dev = torch.device(device) if device is not None else inputs.leaves(x)[0].device
        self.x, self.y = (inputs.apply(lambda t: t.to(dev), v) for v in (x, y))
        self.sampler = SlotSampler(torch.arange(rows, device=dev), batch_size, seed)

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def next_batch(self, slots: Sequence[int] | None = None) -> tuple[Any, Any]:
        """The next shared batch ``(xb [B, ...], yb [B, ...])``; ``slots`` is accepted and ignored."""
        b = next(self.sampler)
        return tuple(inputs.apply(lambda t: t.index_select(0, b), v) for v in (self.x, self.y))

    def state_dict(self) -> dict[str, Any]:
        """The stream's position: its sampler's order and place in the epoch."""
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Go on from a :meth:`state_dict` position."""
        self.sampler.load_state_dict(state["sampler"])


def _check_rows(x: Any, y: Any) -> int:
    """Rows of a training set ``x`` (a tensor or a dict of columns) and of its targets ``y`` (or None): equal."""
    n = inputs.num_rows(x)
    if y is not None and inputs.num_rows(y, what="y") != n:
        raise ValueError(f"x has {n} rows but y has {inputs.num_rows(y, what='y')}")
    return n


def resized(items: list, capacity: int, keep: Sequence[int] | None) -> list:
    """Per-slot items after :meth:`ModelBatch.resize`: new slot ``j`` takes ``items[keep[j]]``, the rest ``None``."""
    keep = list(range(min(len(items), capacity))) if keep is None else list(keep)
    if len(keep) > capacity:
        raise ValueError(f"keep lists {len(keep)} slots but capacity is {capacity}")
    return [items[k] for k in keep] + [None] * (capacity - len(keep))


class SlotStreamsState:
    """``state_dict``/``load_state_dict`` of per-slot streams, built on their ``slot_state``/``load_slot_state``."""

    num_slots: int

    def state_dict(self) -> dict[str, Any]:
        return {"samplers": [self.slot_state(i) for i in range(self.num_slots)]}

    def load_state_dict(self, state: Any) -> None:
        saved = state["samplers"]
        if len(saved) != self.num_slots:
            raise ValueError(f"state has {len(saved)} slots, these streams have {self.num_slots}")
        for i, st in enumerate(saved):
            if st is not None:
                self.load_slot_state(i, st)


class PerSlotStreams(SlotStreamsState):
    """One :class:`SlotSampler` per slot over shared on-device ``x``/``y`` (``per_slot = True``).

    Args:
        x, y: the data set; slots draw rows of it (kept on ``device``). ``x`` may be
            a dict of columns (keyword inputs) and ``y`` None (labels among them).
        batch_size: rows per slot per step (the same for every slot, so the
            gathered batch is one ``[n, B, ...]`` tensor).
        seeds: one seed per slot; its length is the number of slots.
        indices: one LongTensor of row numbers per slot (e.g. from
            :func:`bootstrap`, :func:`kfold` or :func:`shards`); default: all rows.
    """

    per_slot = True

    def __init__(self, x: Any, y: Any, batch_size: int, seeds: Sequence[int],
                 indices: Sequence[torch.Tensor] | None = None, device: torch.device | str | None = None):
        self._rows = _check_rows(x, y)
        seeds = [int(s) for s in seeds]
        if indices is not None and len(indices) != len(seeds):
            raise ValueError(f"got {len(seeds)} seeds but {len(indices)} index sets; give one of each per slot")
        dev = torch.device(device) if device is not None else inputs.leaves(x)[0].device
        self._device = dev
        self.x, self.y = (inputs.apply(lambda t: t.to(dev), v) for v in (x, y))
        self.batch_size = check_batch_size(batch_size)
        self._all: torch.Tensor | None = None
        self.samplers: list[SlotSampler | None] = [
            self._make(seed, None if indices is None else indices[i]) for i, seed in enumerate(seeds)
        ]

    @property
    def device(self) -> torch.device:
        """Where the streams' batches are made."""
        return self._device

    @property
    def num_slots(self) -> int:
        """How many slots have a stream place (some may have no stream yet)."""
        return len(self.samplers)

    def _make(self, seed: int, indices: torch.Tensor | None) -> SlotSampler:
        if indices is None:
            if self._all is None:
                self._all = torch.arange(self._rows, device=self.device)
            idx = self._all
        else:
            idx = _as_index(indices, self.device)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self._rows):
                raise IndexError(f"slot indices must be in [0, {self._rows}), got range "
                                 f"[{int(idx.min())}, {int(idx.max())}]")
        return SlotSampler(idx, self.batch_size, seed)

    def next_batch(self, slots: Sequence[int] | torch.Tensor,
                   skip: Sequence[bool] | None = None) -> tuple[Any, Any]:
        """Batches of the named slots, ``(xb [n, B, ...], yb [n, B, ...])`` aligned with ``slots``.

        Only these slots' samplers advance. ``skip`` (aligned with ``slots``)
        marks slots that are masked out of the step: their samplers stay where
        they are and their rows repeat another slot's batch (any rows do: the
        step leaves those slots untouched). The ``[n, B]`` row index is built
        on the device and used for one gather per tensor.
        """
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        rows: list[torch.Tensor | None] = []
        for j, i in enumerate(slots):
            if skip is not None and skip[j]:
                rows.append(None)
                continue
            sampler = self.samplers[i]
            if sampler is None:
                raise RuntimeError(f"slot {i} has no data stream yet; call reset_slot({i}, seed, indices) first")
            rows.append(next(sampler))
        if not rows:
            empty = torch.zeros(0, self.batch_size, dtype=torch.long, device=self.device)
            return tuple(inputs.apply(lambda t: t[empty], v) for v in (self.x, self.y))
        filler = next((r for r in rows if r is not None), None)
        if filler is None:
            filler = torch.arange(self.batch_size, device=self.device) % self._rows
        idx = torch.cat([filler if r is None else r for r in rows])  # [n*B]: slot j's rows j*B..(j+1)*B-1
        n, b = len(rows), self.batch_size
        gather = lambda t: t.index_select(0, idx).view(n, b, *t.shape[1:])  # noqa: E731
        return inputs.apply(gather, self.x), inputs.apply(gather, self.y)

    def capture_slot(self, i: int) -> Any:
        """Slot ``i``'s stream position as an opaque value for :meth:`restore_slot` (a run-ahead snapshot).

        Cheaper than :meth:`slot_state`: the epoch's permutation and the
        generator state are shared, not redrawn on restore.
        """
        s = self.samplers[i]
        return None if s is None else s.capture()

    def restore_slot(self, i: int, captured: Any) -> None:
        """Put slot ``i``'s stream back where :meth:`capture_slot` found it."""
        sampler = self.samplers[i]
        if sampler is not None and captured is not None:
            sampler.restore(captured)

    def reset_slot(self, i: int, seed: int, indices: torch.Tensor | None = None) -> None:
        """Give slot ``i`` a new stream (e.g. a new trial in a freed slot)."""
        self.samplers[i] = self._make(int(seed), indices)

    def resize(self, capacity: int, keep: Sequence[int] | None = None) -> None:
        """Follow :meth:`ModelBatch.resize`: new slot ``j`` keeps old slot ``keep[j]``'s stream.

        Slots beyond ``len(keep)`` have no stream until :meth:`reset_slot`.
        """
        self.samplers = resized(self.samplers, capacity, keep)

    def slot_state(self, i: int) -> dict[str, Any] | None:
        """The stream position of slot ``i`` (for a per-trial checkpoint)."""
        s = self.samplers[i]
        return None if s is None else s.state_dict()

    def load_slot_state(self, i: int, state: dict[str, Any]) -> None:
        """Go on from a :meth:`slot_state` position in slot ``i``'s stream (it must have one: :meth:`reset_slot`)."""
        sampler = self.samplers[i]
        if sampler is None:
            raise RuntimeError(f"slot {i} has no data stream; call reset_slot first, then load its state")
        sampler.load_state_dict(state)


# --------------------------------------------------------------------- routing
def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def bootstrap(n: int, num_slots: int, seed: int) -> list[torch.Tensor]:
    """Bootstrap resamples (bagging): for each slot, ``n`` rows drawn with replacement."""
    if n < 1 or num_slots < 1:
        raise ValueError(f"bootstrap needs n >= 1 and num_slots >= 1, got n={n}, num_slots={num_slots}")
    g = _generator(seed)
    return [torch.randint(0, n, (n,), generator=g) for _ in range(num_slots)]


def kfold(n: int, k: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """K-fold split: fold ``j`` is slot ``j``'s validation set and slot ``j`` trains on the other folds.

    Rows are shuffled once with ``seed``; fold sizes differ by at most one.
    Returns ``(train_indices, val_indices)``, both lists of ``k`` sorted LongTensors.
    """
    if not 2 <= k <= n:
        raise ValueError(f"kfold needs 2 <= k <= n, got k={k}, n={n}")
    folds = list(torch.randperm(n, generator=_generator(seed)).tensor_split(k))
    val = [f.sort().values for f in folds]
    train = [torch.cat([f for i, f in enumerate(folds) if i != j]).sort().values for j in range(k)]
    return train, val


def shards(n: int, num_slots: int, seed: int) -> list[torch.Tensor]:
    """Disjoint shards covering every row once (sizes differ by at most one), one per slot."""
    if not 1 <= num_slots <= n:
        raise ValueError(f"shards needs 1 <= num_slots <= n, got num_slots={num_slots}, n={n}")
    return [s.sort().values for s in torch.randperm(n, generator=_generator(seed)).tensor_split(num_slots)]


def padded_per_slot(
    x: torch.Tensor, y: torch.Tensor, indices: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-slot sets of unequal size as one padded batch: ``(xs [S, N_max, ...], ys, mask [S, N_max])``.

    Pass the result to ``FusedEngine.evaluate(xs, ys, metrics, per_slot=True,
    mask=mask)`` with per-example metrics (see :mod:`ray_modelbatch.metrics`).
    Padding repeats a real row of the slot rather than zeros, so a metric can
    never produce NaN on padding (``NaN * 0`` would still poison the mean).
    """
    if not indices:
        raise ValueError("padded_per_slot needs at least one slot's indices")
    dev = inputs.leaves(x)[0].device
    idx = [_as_index(i, dev) for i in indices]
    if any(i.numel() == 0 for i in idx):
        raise ValueError("every slot needs at least one row; got an empty index set")
    n_max = max(i.numel() for i in idx)
    rows = torch.stack([torch.cat([i, i[:1].expand(n_max - i.numel())]) for i in idx])
    lengths = torch.tensor([i.numel() for i in idx], device=dev)
    mask = torch.arange(n_max, device=dev).unsqueeze(0) < lengths.unsqueeze(1)
    return inputs.apply(lambda t: t[rows], x), inputs.apply(lambda t: t.to(dev)[rows], y), mask


SWEEP_DATA = "(x_train, y_train, x_val, y_val)"


def sweep_data(items: Any, device: torch.device | str = "cpu") -> tuple[Any, ...]:
    """What a trainable's ``data()`` returned, checked and as four tensors on ``device``.

    ``x_train``/``x_val`` may be dicts of columns, the model's keyword inputs
    (``{"input_ids": ..., "attention_mask": ...}``), and then ``y_train``/``y_val``
    may be None: the labels are a column (``"labels"``), as Hugging Face
    batches have them (see :mod:`ray_modelbatch.inputs`).

    A slot host calls this once when it starts. Every problem is one line that
    names the fix, raised as ``ValueError``/``TypeError``, instead of an
    unpacking error deep in the host.
    """
    if not isinstance(items, (tuple, list)) or len(items) != 4:
        got = f"{len(items)} items" if isinstance(items, (tuple, list)) else f"a {type(items).__name__}"
        raise ValueError(f"data() must return four tensors {SWEEP_DATA}; it returned {got}. Fix: return the "
                         "training and the validation set, e.g. `return x[:n], y[:n], x[n:], y[n:]`.")
    names = ("x_train", "y_train", "x_val", "y_val")
    x, y, xv, yv = (inputs.tensors(t, name, device, f"return tensors or arrays {SWEEP_DATA}")
                    for name, t in zip(names, items))
    if inputs.is_columns(x) != inputs.is_columns(xv):
        raise ValueError("data(): one of x_train and x_val is a dict of columns and the other is not; give both "
                         "sets in the same form.")
    if (y is None) != (yv is None) or (y is None and not inputs.is_columns(x)):
        raise ValueError("data(): y_train and y_val may be None only together, and only when x_train and x_val are "
                         "dicts whose columns hold the labels (e.g. {'input_ids': ..., 'labels': ...}).")
    for a, b, pair in ((x, y, "x_train and y_train"), (xv, yv, "x_val and y_val")):
        rows = [_rows_of(v) for v in (a, b) if v is not None]
        if None in rows or len(set(rows)) != 1:
            raise ValueError(f"data(): {pair} must have one row per example; got shapes {inputs.describe(a)} and "
                             f"{inputs.describe(b)}. Fix: return {SWEEP_DATA} with matching first dimensions.")
    n, nv = inputs.num_rows(x, what="x_train"), inputs.num_rows(xv, what="x_val")
    if n == 0 or nv == 0:
        raise ValueError(f"data(): the training set has {n} rows and the validation set {nv}; "
                         "both need at least one.")
    if inputs.is_columns(x):
        if sorted(x) != sorted(xv):
            raise ValueError(f"data(): x_train has columns {sorted(x)} but x_val {sorted(xv)}. Fix: give both sets "
                             "the same columns.")
    elif x.shape[1:] != xv.shape[1:]:
        raise ValueError(f"data(): x_train rows have shape {tuple(x.shape[1:])} but x_val rows "
                         f"{tuple(xv.shape[1:])}. Fix: give both sets the same features.")
    return x, y, xv, yv


def _rows_of(v: Any) -> int | None:
    """Rows of a tensor or of every column of a dict; None when there is no row dimension or columns disagree."""
    sizes = {t.shape[0] if t.dim() else None for t in inputs.leaves(v)}
    return sizes.pop() if len(sizes) == 1 else None


def resolve_steps_per_report(value: int | str, num_examples: int | None, batch_size: int) -> int:
    """Fused steps per report: an int as given, or ``"epoch"``: one epoch of ``num_examples`` rows.

    An epoch is ``num_examples // batch_size`` steps, as in
    :attr:`SlotSampler.batches_per_epoch`: every batch is full and the
    incomplete one at the end of an epoch is dropped, so after ``k`` reports
    of ``"epoch"`` a slot has run exactly ``k`` epochs of its sampler (when
    its rows are ``num_examples``; k-fold or bootstrap slots have their own
    counts, see ``steps_per_epoch(slot)`` of the streams).

    ``num_examples`` is None when the training data cannot say (a factory of
    iterables without ``len()``, see
    :class:`~ray_modelbatch.iterable_streams.IterableStreams`): an int works,
    ``"epoch"`` is refused in one line.
    """
    if isinstance(value, str):
        if value != "epoch":
            raise ValueError(f"steps_per_report must be a positive int or \"epoch\", got {value!r}")
        if num_examples is None:
            raise ValueError("steps_per_report=\"epoch\" needs the length of an epoch, but the training data does "
                             "not know it (a factory whose iterables have no len(), e.g. generators); give "
                             "steps_per_report as an int, or make the factory return a DataLoader over a sized "
                             "Dataset.")
        if batch_size < 1 or num_examples < batch_size:
            raise ValueError(f"steps_per_report=\"epoch\" needs batch_size <= the training rows, got batch_size "
                             f"{batch_size} and {num_examples} rows (an epoch would be no full batch).")
        return int(num_examples) // int(batch_size)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"steps_per_report must be a positive int or \"epoch\", got {value!r}")
    return int(value)


SWEEP_INPUTS = ("four tensors (x_train, y_train, x_val, y_val), two dicts of columns (train, val) such as "
                "{'input_ids': ..., 'attention_mask': ..., 'labels': ...}, two map-style Datasets (train, val), "
                "or a dict "
                "{'train': Dataset or factory(seed, epoch) -> iterable of (x, y) or dict batches, 'val': Dataset or "
                "(x_val, y_val), 'transform': fn (optional, Datasets only), 'fields': (x_key, y_key) (optional)}")


def sweep_inputs(items: Any, device: torch.device | str = "cpu") -> Any:
    """What a trainable's ``data()`` returned, checked: tensors as :func:`sweep_data` gives them, or datasets.

    * ``(x_train, y_train, x_val, y_val)``: exactly :func:`sweep_data`'s result.
    * ``(train_columns, val_columns)`` or ``{"train": columns, "val": columns}``, each a
      dict of tensors whose rows are examples (a tokenizer's output plus ``"labels"``):
      ``(train_columns, None, val_columns, None)``. Each batch is such a dict,
      the model is called ``model(**batch)`` and a ``train_step`` gets the dict.
    * ``(train_dataset, val_dataset)`` or ``{"train": ..., "val": ..., "transform": fn, "fields": ...}``:
      a :class:`~ray_modelbatch.dataset_streams.DatasetInputs` whose training
      set stays a map-style dataset (streamed per slot by
      :class:`~ray_modelbatch.dataset_streams.DatasetStreams`) and whose
      validation set is collated once into tensors on ``device``.
    * ``{"train": factory, "val": ...}`` where ``factory(seed, epoch)``
      returns an iterable of ``(x, y)`` batches, or of dict batches with a
      ``"labels"`` column (a pipeline that is not random-access): a ``DatasetInputs`` with ``iterable=True``, streamed per
      slot by :class:`~ray_modelbatch.iterable_streams.IterableStreams`.

    :func:`~ray_modelbatch.dataset_streams.per_slot_streams` builds the
    streams for either. Anything else is one ``ValueError``/``TypeError`` line
    naming what came back and the accepted forms.
    """
    from .dataset_streams import check_map_dataset, dataset_inputs  # imports this module

    if _column_pair(items):
        train, val = (items["train"], items["val"]) if isinstance(items, dict) else items
        return sweep_data((train, None, val, None), device)
    if isinstance(items, dict):
        unknown = sorted(set(map(str, items)) - {"train", "val", "transform", "fields"})
        missing = [k for k in ("train", "val") if k not in items]
        if unknown or missing:
            what = f"unknown keys {unknown}" if unknown else f"no {' and no '.join(repr(k) for k in missing)}"
            raise ValueError(f"data() returned a dict with {what}; it must return {SWEEP_INPUTS}.")
        from .iterable_streams import is_iterable_factory, iterable_inputs

        if is_iterable_factory(items["train"]):
            if items.get("transform") is not None:
                raise ValueError("data() returned a factory of iterables with a 'transform'; augment inside "
                                 "factory(seed, epoch) (seeded from its arguments), where the batches are made.")
            return iterable_inputs(items["train"], items["val"], items.get("fields"), device)
        return dataset_inputs(items["train"], items["val"], items.get("transform"), items.get("fields"), device)
    if isinstance(items, (tuple, list)) and len(items) == 4:
        return sweep_data(items, device)
    if isinstance(items, (tuple, list)) and len(items) == 2:
        for name, d in zip(("train", "val"), items):
            try:
                check_map_dataset(d, f"the {name} set")
            except TypeError as exc:
                raise TypeError(f"data() returned two items and {exc} It must return {SWEEP_INPUTS}.") from None
        return dataset_inputs(items[0], items[1], device=device)
    got = f"{len(items)} items" if isinstance(items, (tuple, list)) else f"a {type(items).__name__}"
    raise ValueError(f"data() returned {got}; it must return {SWEEP_INPUTS}.")


def _column_pair(items: Any) -> bool:
    """Whether ``data()`` returned a training and a validation set as dicts of columns (tensors or arrays)."""
    if isinstance(items, dict) and set(items) == {"train", "val"}:
        pair = (items["train"], items["val"])
    elif isinstance(items, (tuple, list)) and len(items) == 2:
        pair = tuple(items)
    else:
        return False
    return all(inputs.is_columns(d) and len(d) > 0 and not any(isinstance(v, Mapping) for v in d.values())
               for d in pair)
