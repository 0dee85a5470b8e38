"""Per-slot streams over a map-style ``torch.utils.data.Dataset``, with augmentation seeded per trial.

:class:`DatasetStreams` is :class:`~ray_modelbatch.data.PerSlotStreams` for data
that is not two tensors on the device: a map-style dataset (``__len__`` and
``__getitem__`` returning ``(x, y)``, a longer tuple, or a dict), optionally
with a per-example ``transform`` (augmentation). It has the same interface, so
a stack uses either.

Why it is built this way:

* **Same batches as a solo run.** Slot ``i`` owns an :class:`AugmentedSampler`:
  a :class:`~ray_modelbatch.data.SlotSampler` over the dataset's row numbers
  (seeded with the trial's seed, exactly as ``PerSlotStreams`` does) plus the
  slot's augmentation generator (seeded with :func:`augment_seed` of the same
  seed). :class:`SlotLoader` is the one-model equivalent; slot ``i`` of a
  ``DatasetStreams`` yields exactly what ``SlotLoader(dataset, B, seed_i,
  transform)`` yields.
* **Augmentation is part of the slot's state.** Each step a slot draws its
  ``B`` rows from its sampler and, when there is a transform, ``B`` example
  seeds from its augmentation generator (``torch.randint(2**32, (B,))``).
  Example ``k`` is transformed with a generator seeded with its own seed. The
  sampler's and the augmentation generator's states are what
  ``capture_slot``/``restore_slot`` and ``slot_state``/``load_slot_state``
  carry, so a rolled-back slot replays the same augmented batches and a
  checkpoint resumes them. One seed per example (rather than one generator
  walked through the batch) makes the result independent of ``num_workers``
  and of thread scheduling.
* **Two kinds of transform.** ``transform(sample, generator) -> sample``
  (two positional parameters) receives the whole example and the example's
  generator, and must draw only from that generator; the generator is valid
  for the call only (it is re-seeded for the next example). A plain
  torchvision-style ``transform(x) -> x`` (one parameter, or ``*args``) is
  applied to the example's ``x`` and draws from torch's global CPU RNG: the
  streams fork that RNG around the step (``torch.random.fork_rng``) and seed
  it with the example's seed before each call, so these transforms are per
  trial reproducible too, and the caller's global RNG is left as it was.
  They run on the calling thread (the global RNG cannot be shared by
  threads). Python's ``random`` and NumPy's global RNG are not seeded: a
  transform drawing from them is not reproducible.
* **Host assembly, one copy per step.** Examples are read and transformed on
  the host, stacked into one ``[n * B, ...]`` buffer per tensor (pinned when
  the device is CUDA) and copied to the stack's device once per step, with
  ``non_blocking``. Only each step's batches live on the device, so this is
  also the path for training sets that do not fit in device memory (see
  :class:`~ray_modelbatch.host_streams.HostTensorStreams` for tensors).
* **Batched reads.** A dataset with ``__getitems__(rows) -> list of
  examples`` (what ``DataLoader`` calls when it exists) is read with it,
  once per chunk of rows, instead of one ``__getitem__`` per example. A
  ``TensorDataset`` of ``(x, y)``, or ``random_split``'s ``Subset`` objects of one,
  without a transform, is read as one gather of its tensors per batch
  (:func:`tensor_rows`): the same rows in the same order, 4x faster for
  the Tune CIFAR tutorial's batches.
* **Optional threads.** ``num_workers >= 2`` reads and transforms examples
  on a thread pool, in contiguous chunks whose results are joined in order,
  so batches are the same as with ``num_workers=0``. Threads help when
  ``__getitem__`` waits (files, decoding in C code that releases the GIL);
  small tensor transforms mostly hold the GIL (see
  ``benchmarks/data_pipeline.py``).

Examples may be dicts of keyword inputs with the labels among them, as a
Hugging Face ``datasets.Dataset`` with ``.with_format("torch")`` gives them
(``{"input_ids": ..., "attention_mask": ..., "labels": ...}``): without
``fields``, a dict example with a ``"labels"`` key (the keyword transformers
models take) and no ``"x"``/``"y"`` is the model's whole input; batches are
then dicts of stacked columns and the target is None (see
:mod:`ray_modelbatch.inputs`).

``__getitem__`` itself must be deterministic (randomness belongs in the
transform). Validation data is not streamed: :func:`dataset_inputs` collates
the whole validation set once into tensors on the device, so evaluation stays
one fused pass.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset
from torch.utils.data import default_collate

from . import inputs
from .data import PerSlotStreams, SlotSampler, SlotStreamsState, _as_index, resized
from .host_streams import HostTensorStreams, _on_cpu, expand_skipped, staging, to_device

__all__ = [
    "AugmentedSampler",
    "SampleLoader",
    "SlotLoader",
    "DatasetStreams",
    "HostTensorStreams",
    "DatasetInputs",
    "augment_seed",
    "dataset_inputs",
    "per_slot_streams",
]

EXAMPLE_SEED_BOUND = 2**32  # torch's CPU generator (mt19937) uses the low 32 bits of a seed


def augment_seed(seed: int) -> int:
    """The seed of a slot's augmentation generator, derived from the trial's ``seed``.

    Not ``seed`` itself: the slot's sampler is seeded with that, and two
    generators with one seed would draw the same numbers for the shuffle and
    for the augmentation. The map is one-to-one on the 32 bits torch uses.
    """
    return (int(seed) * 0x9E3779B1 + 0x7F4A7C15) % EXAMPLE_SEED_BOUND


def takes_generator(transform: Callable[..., Any]) -> bool:
    """Whether ``transform`` is called ``transform(sample, generator)``: it has two positional parameters."""
    try:
        params = inspect.signature(transform).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: plain style
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds for p in params) >= 2


def check_map_dataset(obj: Any, what: str = "the dataset") -> None:
    """Raise one clear line unless ``obj`` is a map-style dataset (``__len__`` and ``__getitem__``)."""
    if isinstance(obj, DataLoader):
        raise TypeError(f"{what} is a DataLoader; pass its map-style dataset (`loader.dataset`): batching, "
                        "shuffling and workers are the streams' job, per slot (or return {'train': "
                        "factory(seed, epoch) -> DataLoader, 'val': ...} to keep the loader).")
    if isinstance(obj, IterableDataset):
        raise TypeError(f"{what} is an IterableDataset ({type(obj).__name__}); per-slot shuffling and rollback "
                        "need random access, so give a map-style Dataset (__len__ and __getitem__), or return "
                        "{'train': factory(seed, epoch) -> iterable of (x, y) batches, 'val': ...}.")
    if isinstance(obj, (torch.Tensor, str, bytes, Mapping)) or type(obj).__module__ == "numpy":
        raise TypeError(f"{what} is a {type(obj).__name__}, not a map-style Dataset (an object with __len__ and "
                        "__getitem__ returning one (x, y) example).")
    if not (hasattr(obj, "__len__") and hasattr(obj, "__getitem__")):
        hint = (" (a factory(seed, epoch) of iterables goes in a dict: {'train': factory, 'val': ...})"
                if callable(obj) else "")
        raise TypeError(f"{what} is a {type(obj).__name__} without __len__ and __getitem__; give a map-style "
                        f"torch.utils.data.Dataset whose items are (x, y) examples{hint}.")


def pick(sample: Any, fields: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """``(x, y)`` of one example: ``fields`` names them (default ``(0, 1)`` for tuples, ``("x", "y")`` for dicts).

    A dict example with ``"labels"`` and without ``"x"``/``"y"`` (and no
    ``fields``) is keyword inputs with its labels inside: ``(sample, None)``.
    """
    if fields is None:
        if isinstance(sample, Mapping) and "labels" in sample and not ("x" in sample or "y" in sample):
            return dict(sample), None
        if isinstance(sample, Mapping):
            fields = ("x", "y")
        elif isinstance(sample, (tuple, list)):
            fields = (0, 1)
        else:
            raise TypeError(f"a dataset example is a {type(sample).__name__}; it must be (x, y), a longer tuple or a "
                            "dict (pass fields=(x_key, y_key) to name its input and target).")
    try:
        return sample[fields[0]], sample[fields[1]]
    except (KeyError, IndexError, TypeError):
        have = list(sample.keys()) if isinstance(sample, Mapping) else f"{type(sample).__name__} of {len(sample)}"
        raise ValueError(f"a dataset example has no fields {fields!r} (it has {have}); pass fields=(x_key, y_key) "
                         "naming its input and target, or call its label column 'labels' to give the whole example "
                         "to the model as keyword inputs (model(**batch)).") from None


def unused_fields(sample: Any, fields: tuple[Any, Any] | None) -> str | None:
    """What of one example :func:`pick` leaves out of ``(x, y)`` (``"items [2]"``, ``"keys ['w']"``), or None."""
    if isinstance(sample, Mapping):
        if fields is None and "labels" in sample and not ("x" in sample or "y" in sample):
            return None  # the whole example is the model's keyword inputs
        used = set(fields or ("x", "y"))
        rest = [k for k in sample if k not in used]
        return f"keys {rest}" if rest else None
    if isinstance(sample, (tuple, list)):
        used = set(fields or (0, 1))
        rest = [i for i in range(len(sample)) if i not in used and i - len(sample) not in used]
        return f"items {rest}" if rest else None
    return None


def stack(values: list[Any], what: str, device: torch.device) -> Any:
    """One host tensor ``[len(values), ...]`` of the examples' ``what`` (pinned when bound for CUDA).

    Tensors are stacked straight into the staging buffer; anything else goes
    through ``default_collate`` (numbers, NumPy arrays). Dict examples give a
    dict of such tensors, one per column; examples without targets give None.
    """
    if values and all(v is None for v in values):
        return None
    if values and all(isinstance(v, Mapping) for v in values):
        keys = list(values[0])
        if any(list(v) != keys and sorted(v) != sorted(keys) for v in values):
            raise ValueError(f"examples' {what} have different columns ({keys} and others); every example needs the "
                             "same keys to be batched.")
        return {k: stack([v[k] for v in values], f"{what}[{k!r}]", device) for k in keys}
    if values and all(isinstance(v, torch.Tensor) for v in values):
        first = values[0]
        out = staging((len(values), *first.shape), first.dtype, device)
        try:
            return torch.stack(values, out=out)
        except RuntimeError:
            bad = next((v for v in values if v.shape != first.shape or v.dtype != first.dtype), None)
            if bad is None:
                raise
            raise ValueError(f"examples' {what} differ: {tuple(first.shape)} {first.dtype} and {tuple(bad.shape)} "
                             f"{bad.dtype}; every example needs the same shape and dtype to be batched (crop or "
                             "pad in the transform).") from None
    try:
        out = default_collate(values)
    except Exception as exc:  # noqa: BLE001 - whatever default_collate rejects: name it in one line
        raise TypeError(f"cannot batch the examples' {what} (a {type(values[0]).__name__}): {exc}. Make "
                        f"{what} a tensor, a number or a NumPy array (end the transform with a to-tensor step).") \
            from None
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the examples' {what} batch to a {type(out).__name__}, not a tensor; a stack needs {what} "
                        "as one tensor per example (pass fields=(x_key, y_key) for dict examples).")
    return out.pin_memory() if device.type == "cuda" else out


class AugmentedSampler:
    """One slot's position: a :class:`SlotSampler` over row numbers plus its augmentation generator.

    Both are seeded from the trial's ``seed`` (the generator with
    :func:`augment_seed`). :meth:`draw` advances both; the generator only
    advances when the stream has a transform.
    """

    def __init__(self, indices: torch.Tensor, batch_size: int, seed: int):
        self.sampler = SlotSampler(indices, batch_size, seed)
        self.augment = torch.Generator(device="cpu")
        self.augment.manual_seed(augment_seed(seed))

    @property
    def seed(self) -> int:
        return self.sampler.seed

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    def draw(self, augment: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next batch's row numbers and, if ``augment``, one seed per example."""
        rows = next(self.sampler)
        seeds = torch.randint(EXAMPLE_SEED_BOUND, (rows.numel(),), generator=self.augment) if augment else None
        return rows, seeds

    def capture(self) -> tuple:
        """Where the slot is, cheaply (see :meth:`SlotSampler.capture`); for :meth:`restore`."""
        return self.sampler.capture(), self.augment.get_state()

    def restore(self, captured: tuple) -> None:
        sampler, augment = captured
        self.sampler.restore(sampler)
        self.augment.set_state(augment)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers: ``{"sampler": SlotSampler.state_dict(), "augment_state": ByteTensor}``."""
        return {"sampler": self.sampler.state_dict(), "augment_state": self.augment.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "sampler" not in state or "augment_state" not in state:
            raise ValueError(f"not a dataset stream state (keys {sorted(state)}); a PerSlotStreams state has no "
                             "augmentation position, so it cannot resume a DatasetStreams slot.")
        state = _on_cpu(dict(state))
        self.sampler.load_state_dict(state["sampler"])
        self.augment.set_state(state["augment_state"])


class SampleLoader:
    """Reads examples of a map-style dataset by row number and transforms them, in order.

    Args:
        dataset: map-style dataset.
        transform: per-example transform (see the module docstring for the two kinds).
        fields: keys/positions of ``x`` and ``y`` in an example (default ``(0, 1)`` or ``("x", "y")``).
        num_workers: threads reading and transforming examples; below 2, the calling thread does it.
        transform_takes_generator: force the transform's kind; default: from its signature.
    """

    def __init__(self, dataset: Any, transform: Callable[..., Any] | None = None, *,
                 fields: tuple[Any, Any] | None = None, num_workers: int = 0,
                 transform_takes_generator: bool | None = None):
        check_map_dataset(dataset)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got a {type(transform).__name__}")
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self._told_dropped = False  # whether the examples' unused fields were named (once per loader)
        self.dataset, self.transform, self.fields = dataset, transform, None if fields is None else tuple(fields)
        self.num_workers = int(num_workers)
        self.generator_style = transform is not None and (
            takes_generator(transform) if transform_takes_generator is None else bool(transform_takes_generator))
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        # Untransformed (x, y) rows of a TensorDataset, or of Subsets of one (random_split's): read as one
        # index_select per batch instead of a __getitem__ per example, the same rows in the same order.
        self._rows = tensor_rows(dataset) if transform is None and self.fields in (None, (0, 1)) else None

    def batch(self, rows: Sequence[int], seeds: Sequence[int] | None, device: torch.device) -> tuple[Any, Any]:
        """``collate(*load(rows, seeds), device)``: the batch of these rows, as host tensors ``[len(rows), ...]``.

        For a tensor-backed dataset (:func:`tensor_rows`) the rows are gathered
        straight from its tensors: the Tune CIFAR tutorial's ``random_split`` of
        a ``TensorDataset``, 2 slots x 16 rows of 1x32x32 images, took 0.14 ms a
        step read example by example and 0.036 ms as a gather.
        """
        if self._rows is None:
            return self.collate(*self.load(rows, seeds), device)
        (x, y), index = self._rows
        at = torch.as_tensor(list(rows), dtype=torch.long)
        if index is not None:
            at = index.index_select(0, at)
        return tuple(torch.index_select(t, 0, at, out=staging((at.numel(), *t.shape[1:]), t.dtype, device))
                     for t in (x, y))

    def _scratch(self) -> torch.Generator:
        """This thread's generator, re-seeded for every example."""
        g = getattr(self._local, "generator", None)
        if g is None:
            g = self._local.generator = torch.Generator(device="cpu")
        return g

    def _read(self, rows: Sequence[int], seeds: Sequence[int] | None) -> tuple[list, list]:
        xs, ys = [], []
        g = self._scratch() if self.generator_style and seeds is not None else None
        getitems = getattr(self.dataset, "__getitems__", None)  # a batched read, as DataLoader uses it
        samples = getitems(list(rows)) if getitems else [self.dataset[r] for r in rows]
        dropped = None
        for k, sample in enumerate(samples):
            if g is not None:
                g.manual_seed(seeds[k])
                sample = self.transform(sample, g)
            if k == 0 and not self._told_dropped:  # once per loader, from the first example it reads (transformed)
                self._told_dropped, dropped = True, unused_fields(sample, self.fields)
            x, y = pick(sample, self.fields)
            xs.append(x)
            ys.append(y)
        if dropped:
            warnings.warn(f"dataset examples also hold {dropped}, which batches do not carry: a batch is (x, y), "
                          "picked by fields (default items 0 and 1, or keys 'x' and 'y'). To use them, return dict "
                          "examples of keyword inputs with a 'labels' key (the whole example goes to the model), or "
                          "make them part of x.", UserWarning, stacklevel=2)
        return xs, ys

    def load(self, rows: Sequence[int], seeds: Sequence[int] | None = None) -> tuple[list, list]:
        """``(xs, ys)`` at ``rows``, each transformed with its seed (untransformed if ``seeds`` is None)."""
        rows = list(rows)
        if self.num_workers < 2 or len(rows) < 2:
            xs, ys = self._read(rows, seeds)
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_workers, thread_name_prefix="rmb-data")
            bounds = [len(rows) * w // self.num_workers for w in range(self.num_workers + 1)]
            parts = [(rows[a:b], None if seeds is None else seeds[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
            xs, ys = [], []
            for px, py in self._pool.map(lambda p: self._read(*p), parts):  # map keeps the order
                xs += px
                ys += py
        if self.transform is not None and not self.generator_style and seeds is not None:
            with torch.random.fork_rng(devices=[]):
                for k, s in enumerate(seeds):
                    torch.default_generator.manual_seed(int(s))
                    xs[k] = self.transform(xs[k])
        return xs, ys

    def collate(self, xs: list, ys: list, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Host tensors ``[len(xs), ...]`` (pinned when bound for CUDA)."""
        return stack(xs, "x", device), stack(ys, "y", device)

    def close(self) -> None:
        """Stop the worker threads (they are started again if needed)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pool"], state["_local"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()


def tensor_rows(dataset: Any) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None] | None:
    """``((x, y), index)`` when ``dataset`` is a ``TensorDataset`` of two CPU tensors or (nested) ``Subset`` objects
    of one: example ``k`` is ``(x[index[k]], y[index[k]])`` (``index`` None: ``k`` itself); else None.

    Only those exact classes: a subclass may override ``__getitem__``."""
    def wrapped(i: torch.Tensor, n: int) -> torch.Tensor:  # Python's negative indices, as __getitem__ reads them
        return torch.where(i < 0, i + n, i)

    index = None
    while type(dataset) is Subset:
        inner = torch.as_tensor(dataset.indices, dtype=torch.long).reshape(-1)
        index = inner if index is None else inner.index_select(0, wrapped(index, inner.numel()))
        dataset = dataset.dataset
    if type(dataset) is not TensorDataset or len(dataset.tensors) != 2:
        return None
    x, y = dataset.tensors
    if x.device.type != "cpu" or y.device.type != "cpu":
        return None
    return (x, y), None if index is None else wrapped(index, len(dataset))


def _dataset_rows(dataset: Any) -> int:
    n = len(dataset)
    if n < 1:
        raise ValueError("the dataset is empty; a slot needs at least batch_size examples")
    return int(n)


class SlotLoader:
    """One model's batches from a dataset: exactly what one slot of :class:`DatasetStreams` sees.

    ``next(loader)`` is ``(x [B, ...], y [B, ...])`` on the host. Use it to
    train a plain model on the batches slot ``i`` gets with ``seed_i``::

        loader = SlotLoader(dataset, batch_size, seed_i, transform=augment)
        for _ in range(steps):
            xb, yb = next(loader)
    """

    def __init__(self, dataset: Any, batch_size: int, seed: int, transform: Callable[..., Any] | None = None,
                 indices: torch.Tensor | None = None, *, fields: tuple[Any, Any] | None = None,
                 num_workers: int = 0, transform_takes_generator: bool | None = None):
        self.loader = SampleLoader(dataset, transform, fields=fields, num_workers=num_workers,
                                   transform_takes_generator=transform_takes_generator)
        idx = torch.arange(_dataset_rows(dataset)) if indices is None else _as_index(indices, "cpu")
        self.position = AugmentedSampler(idx, batch_size, seed)

    def __iter__(self) -> "SlotLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, seeds = self.position.draw(self.loader.transform is not None)
        return self.loader.batch(rows.tolist(), None if seeds is None else seeds.tolist(), torch.device("cpu"))

    def state_dict(self) -> dict[str, Any]:
        return self.position.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.position.load_state_dict(state)


class DatasetStreams(SlotStreamsState):
    """Per-slot streams over a map-style dataset (``per_slot = True``): a drop-in for :class:`PerSlotStreams`.

    Args:
        dataset: map-style dataset; its examples are ``(x, y)``, a longer tuple or a dict (see ``fields``).
        batch_size: examples per slot per step.
        seeds: one seed per slot (the trial's); its length is the number of slots.
        indices: one LongTensor of row numbers per slot (e.g. from
            :func:`~ray_modelbatch.data.kfold`); default every row.
        device: where batches go (the stack's device); default the CPU.
        transform: optional per-example augmentation, ``transform(sample, generator)`` or ``transform(x)``.
        num_workers: threads reading and transforming examples (0: the calling thread).
        fields: keys/positions of ``x`` and ``y`` in an example.
        transform_takes_generator: force the transform's kind (default: from its signature).
    """

    per_slot = True

    def __init__(self, dataset: Any, batch_size: int, seeds: Sequence[int],
                 indices: Sequence[torch.Tensor | None] | None = None, device: torch.device | str | None = None, *,
                 transform: Callable[..., Any] | None = None, num_workers: int = 0,
                 fields: tuple[Any, Any] | None = None, transform_takes_generator: bool | None = None):
        self.loader = SampleLoader(dataset, transform, fields=fields, num_workers=num_workers,
                                   transform_takes_generator=transform_takes_generator)
        self.dataset = dataset
        self._n = _dataset_rows(dataset)
        seeds = [int(s) for s in seeds]
        if indices is not None and len(indices) != len(seeds):
            raise ValueError(f"got {len(seeds)} seeds but {len(indices)} index sets; give one of each per slot")
        self.batch_size = int(batch_size)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._all: torch.Tensor | None = None
        self._template: tuple[torch.Tensor, torch.Tensor] | None = None
        self.samplers: list[AugmentedSampler | None] = [
            self._make(seed, None if indices is None else indices[i]) for i, seed in enumerate(seeds)
        ]

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_slots(self) -> int:
        return len(self.samplers)

    @property
    def num_examples(self) -> int:
        return self._n

    @property
    def transform(self) -> Callable[..., Any] | None:
        return self.loader.transform

    def _make(self, seed: int, indices: torch.Tensor | None) -> AugmentedSampler:
        if indices is None:
            if self._all is None:
                self._all = torch.arange(self._n)
            idx = self._all
        else:
            idx = _as_index(indices, "cpu")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self._n):
                raise IndexError(f"slot indices must be in [0, {self._n}), got range [{int(idx.min())}, "
                                 f"{int(idx.max())}]")
        return AugmentedSampler(idx, self.batch_size, seed)

    def _sampler(self, i: int) -> AugmentedSampler:
        s = self.samplers[i]
        if s is None:
            raise RuntimeError(f"slot {i} has no data stream yet; call reset_slot({i}, seed) first")
        return s

    def steps_per_epoch(self, slot: int | None = None) -> int:
        """Steps in one epoch of ``slot`` (its rows // batch_size: the incomplete batch is dropped).

        ``slot=None``: an epoch of the whole dataset. This is what
        :func:`~ray_modelbatch.data.resolve_steps_per_report` gives for ``"epoch"``.
        """
        return self._n // self.batch_size if slot is None else self._sampler(slot).batches_per_epoch

    def next_batch(self, slots: Sequence[int] | torch.Tensor,
                   skip: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Batches of the named slots, ``(xb [n, B, ...], yb [n, B, ...])`` on the device, aligned with ``slots``.

        Only the live slots advance (their samplers and augmentation
        generators); skipped slots (``skip[j]``) get the first live slot's
        rows. If reading or transforming an example raises, every slot is left
        where it was before the call.
        """
        if isinstance(slots, torch.Tensor):
            slots = slots.tolist()
        slots = [int(s) for s in slots]
        n = len(slots)
        live = [j for j in range(n) if skip is None or not skip[j]]
        if not live:
            return self._filler(n)
        positions = [self._sampler(slots[j]) for j in live]
        before = [p.capture() for p in positions]
        augment = self.loader.transform is not None
        try:
            draws = [p.draw(augment) for p in positions]
            rows = torch.cat([r for r, _ in draws]).tolist()
            seeds = torch.cat([s for _, s in draws]).tolist() if augment else None
            xb, yb = self.loader.batch(rows, seeds, self._device)
        except BaseException:
            for p, c in zip(positions, before):
                p.restore(c)
            raise
        k, b = len(live), self.batch_size
        spread = lambda t: expand_skipped(to_device(t.view(k, b, *t.shape[1:]), self._device), live, n)  # noqa: E731
        return inputs.apply(spread, xb), inputs.apply(spread, yb)

    def _filler(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` rows of a fixed batch (the first ``B`` examples, transformed with fixed seeds): no slot runs."""
        if self._template is None:
            b = self.batch_size
            rows = (torch.arange(b) % self._n).tolist()
            seeds = list(range(b)) if self.loader.transform is not None else None
            xb, yb = self.loader.batch(rows, seeds, self._device)
            one = lambda t: to_device(t.unsqueeze(0), self._device)  # noqa: E731
            self._template = (inputs.apply(one, xb), inputs.apply(one, yb))
        zeros = torch.zeros(n, dtype=torch.long, device=self._device)
        return tuple(inputs.apply(lambda t: t.index_select(0, zeros), v) for v in self._template)

    def capture_slot(self, i: int) -> Any:
        """Slot ``i``'s position (sampler and augmentation generator) for :meth:`restore_slot`: a run-ahead snapshot."""
        s = self.samplers[i]
        return None if s is None else s.capture()

    def restore_slot(self, i: int, captured: Any) -> None:
        s = self.samplers[i]
        if s is not None and captured is not None:
            s.restore(captured)

    def reset_slot(self, i: int, seed: int, indices: torch.Tensor | None = None) -> None:
        """Give slot ``i`` a new stream (a new trial in a freed slot): shuffling and augmentation from ``seed``."""
        self.samplers[i] = self._make(int(seed), indices)

    def resize(self, capacity: int, keep: Sequence[int] | None = None) -> None:
        """Follow :meth:`ModelBatch.resize`: new slot ``j`` keeps old slot ``keep[j]``'s stream."""
        self.samplers = resized(self.samplers, capacity, keep)

    def slot_state(self, i: int) -> dict[str, Any] | None:
        """Slot ``i``'s position as plain tensors and numbers (for a per-trial checkpoint)."""
        s = self.samplers[i]
        return None if s is None else s.state_dict()

    def load_slot_state(self, i: int, state: Mapping[str, Any]) -> None:
        """Resume slot ``i`` from :meth:`slot_state` (its rows must be the same count as when it was saved)."""
        s = self.samplers[i]
        if s is None:
            raise RuntimeError(f"slot {i} has no data stream; call reset_slot first, then load its state")
        s.load_state_dict(state)

    def close(self) -> None:
        """Stop the worker threads, if any."""
        self.loader.close()


# --------------------------------------------------------------- data() forms
class DatasetInputs(NamedTuple):
    """What :func:`~ray_modelbatch.data.sweep_inputs` returns for dataset forms of ``data()``.

    ``train`` stays a dataset (streamed per slot); the validation set is
    tensors on the device, so evaluation is one fused pass. With
    ``iterable=True``, ``train`` is a ``factory(seed, epoch) -> iterable of
    (x, y) batches`` (see :mod:`ray_modelbatch.iterable_streams`); the field
    comes last with a default so that code building or unpacking the five
    older fields keeps working, and ``isinstance(data, DatasetInputs)`` still
    tells a driver that the training set is not tensors.
    """

    train: Any
    x_val: torch.Tensor
    y_val: torch.Tensor
    transform: Callable[..., Any] | None = None
    fields: tuple[Any, Any] | None = None
    iterable: bool = False


VALIDATION_WARN_BYTES = 2 * 2**30  # a validation set this big, collated whole, is named before it is collated


def _materialize(dataset: Any, fields: tuple[Any, Any] | None, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The whole (validation) dataset as two tensors on ``device``, untransformed.

    A set whose first example, times its length, passes ``VALIDATION_WARN_BYTES`` is named in a warning
    first: collating it takes about three times that at its peak (a 300k-row set of 73 MB took 275 MB), and
    running out of memory there says nothing about the validation set."""
    loader = SampleLoader(dataset, fields=fields)
    rows = _dataset_rows(dataset)
    if rows:
        first = loader.load([0])
        per_row = sum(t.numel() * t.element_size() for part in first for v in part
                      for t in inputs.leaves(v) if isinstance(t, torch.Tensor))
        if per_row * rows > VALIDATION_WARN_BYTES:
            warnings.warn(f"the validation set ({rows} examples, about {per_row * rows / 2**30:.1f} GiB) is collated "
                          "whole into tensors (validation is never streamed, so evaluation stays one fused pass), "
                          "which takes up to about three times that in memory while it runs. If memory runs short, "
                          "validate on a subset (torch.utils.data.Subset).", UserWarning, stacklevel=2)
    x, y = loader.batch(range(rows), None, torch.device("cpu"))
    return tuple(inputs.apply(lambda t: t.to(device), v) for v in (x, y))


def validation_tensors(val: Any, fields: tuple[Any, Any] | None, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The validation set (a map-style dataset or ``(x_val, y_val)``) as two checked tensors on ``device``.

    Shared by every non-tensor form of ``data()``: validation is never
    streamed, so evaluation stays one fused pass whatever feeds training.
    """
    if isinstance(val, (tuple, list)) and len(val) == 2 and all(isinstance(v, torch.Tensor) for v in val):
        x_val, y_val = (v.to(device) for v in val)
    elif inputs.is_columns(val) and not hasattr(val, "__getitems__"):  # a dict of columns, labels among them
        x_val, y_val = inputs.tensors(val, "the validation set", device), None
    else:
        check_map_dataset(val, "the validation set")
        x_val, y_val = _materialize(val, fields, device)
    rows = {t.shape[0] if t.dim() else 0 for t in inputs.leaves(x_val) + inputs.leaves(y_val)}
    if len(rows) != 1 or 0 in rows:
        raise ValueError(f"data(): the validation set must have one or more rows of x and y; got shapes "
                         f"{inputs.describe(x_val)} and {inputs.describe(y_val)}.")
    return x_val, y_val


def dataset_inputs(train: Any, val: Any, transform: Callable[..., Any] | None = None,
                   fields: tuple[Any, Any] | None = None, device: torch.device | str = "cpu") -> DatasetInputs:
    """Check a training dataset and materialize the validation set (a dataset or ``(x_val, y_val)``) on ``device``.

    One training example is read and transformed (with a fixed seed) to check
    that ``transform`` runs and that its output matches the validation rows.
    """
    dev = torch.device(device)
    check_map_dataset(train, "the training set")
    if transform is not None and not callable(transform):
        raise TypeError(f"data(): transform is a {type(transform).__name__}; give a callable "
                        "transform(sample, generator) or transform(x), or None.")
    x_val, y_val = validation_tensors(val, fields, dev)
    loader = SampleLoader(train, transform, fields=fields)
    xs, ys = loader.load([0], [0] if transform is not None else None)
    x0, y0 = loader.collate(xs, ys, torch.device("cpu"))
    if inputs.is_columns(x0) or inputs.is_columns(x_val) or (y0 is None) != (y_val is None):
        if not (inputs.is_columns(x0) and inputs.is_columns(x_val)) or sorted(x0) != sorted(x_val) \
                or (y0 is None) != (y_val is None):
            raise ValueError(f"data(): training examples give x {inputs.describe(x0)} and y {inputs.describe(y0)} "
                             f"but the validation set {inputs.describe(x_val)} and {inputs.describe(y_val)}; give "
                             "both in the same form (the same columns).")
    elif x0.shape[1:] != x_val.shape[1:]:
        raise ValueError(f"data(): training examples{' (after transform)' if transform else ''} have x of shape "
                         f"{tuple(x0.shape[1:])} but validation rows {tuple(x_val.shape[1:])}; give both the same "
                         "features.")
    return DatasetInputs(train, x_val, y_val, transform, None if fields is None else tuple(fields))


def per_slot_streams(inputs: Any, batch_size: int, seeds: Sequence[int], device: torch.device | str | None = None,
                     *, num_workers: int = 0, host: bool = False) -> Any:
    """The per-slot streams for what :func:`~ray_modelbatch.data.sweep_inputs` returned.

    Four tensors give :class:`PerSlotStreams` (or :class:`HostTensorStreams`
    with ``host=True``: the training tensors stay in host memory); a
    :class:`DatasetInputs` gives :class:`DatasetStreams`, or
    :class:`~ray_modelbatch.iterable_streams.IterableStreams` when its
    ``train`` is a factory of iterables (``host`` and ``num_workers`` do not
    apply there: batches are always assembled on the host, and workers belong
    to the factory's own ``DataLoader``).
    """
    from .inputs import is_columns

    if isinstance(inputs, DatasetInputs) and inputs.iterable:
        from .iterable_streams import IterableStreams  # it imports this module

        return IterableStreams(inputs.train, batch_size, seeds, device=device, fields=inputs.fields)
    if isinstance(inputs, DatasetInputs):
        return DatasetStreams(inputs.train, batch_size, seeds, device=device, transform=inputs.transform,
                              num_workers=num_workers, fields=inputs.fields)
    x, y = inputs[0], inputs[1]
    if host and (is_columns(x) or y is None):
        raise ValueError("host_memory=True streams tensors (x_train, y_train); for dict batches return a map-style "
                         "Dataset of dict examples instead, which is read on the host one step at a time.")
    if host:
        return HostTensorStreams(x, y, batch_size, seeds, device=device)
    return PerSlotStreams(x, y, batch_size, seeds, device=device)
