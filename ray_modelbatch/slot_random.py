"""Each slot's own random generator, for the random ops of its forward (dropout).

Why: a model alone draws its dropout masks from torch's global generator, in
an order fixed by its own forward. A fused stack that drew one mask for all
slots from that generator would give each slot masks that depend on how many
other slots ran beside it and in which order, so a trial's result would
change with its neighbours, with run-ahead (a rolled-back slot would not draw
the same masks again), with a pause and resume, and would never match the
model trained alone. Here every slot has a generator of its own whose state is
part of the slot's state, like its weights:

* its state is a row of ``states`` (``[S, K]`` bytes, on the CPU), which
  :meth:`slot_tensors` hands to the per-slot protocol, so snapshots, rollback,
  resizing and compaction carry it with everything else;
* a slot added for a trial starts from the state the global generator had
  right after the trial's model was built under its seed
  (:func:`global_state`): exactly where a script that seeds, builds the model
  and trains it alone starts drawing its masks. So on the CPU a fused slot
  draws the masks the model alone draws, bit for bit, wherever its forward
  draws them in the order and shapes the model's own forward does (dropout
  on a slot's activations, attention dropout: see :mod:`.fast_path`);
* a forward opens :meth:`draws` for the rows it runs; the new states are
  written back only when that forward succeeded, and the engine puts back
  the rows of slots that computed but must not move (:meth:`begin`,
  :meth:`revert`), so a masked slot, or a step retried after running out of
  memory, draws the same masks again.

Models on ``torch.vmap`` (those the direct path does not cover, Hugging Face
models, a user's ``train_step``) get the same through :class:`VmapRandom`:
while it is active, ``F.dropout`` (so ``nn.Dropout``) and
``F.dropout1d/2d/3d`` inside ModelBatch's vmapped function draw each slot's
mask from its generator, contiguous in the slot's logical shape, as a model
alone draws it for a contiguous tensor, and ``torch.randn/rand/randint/
randperm/randn_like/rand_like`` (a GAN's noise in a user's step) draw each
slot's values from it. Other random functions there (``torch.normal`` of
tensors, ``Tensor.uniform_``) still draw from the global generator under
vmap's ``randomness="different"``. An evaluation draws from each slot's
generator without moving it (an evaluation may run rows that are not being
evaluated, and must not change what the slot draws next in training).

On CUDA the per-slot generator is a CUDA generator and a mask is drawn with
``bernoulli_``, where ``F.dropout`` on CUDA uses a fused kernel that draws
differently: per slot reproducible and independent of the other slots, but
not the bits of the model alone.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

try:  # functorch's internals: how a value made outside vmap's transform joins it, one row per slot
    from torch._C import _DisableFuncTorch
    from torch._C._functorch import _add_batch_dim, maybe_current_level, maybe_get_level
except ImportError:  # pragma: no cover - a torch without them: vmap'd dropout draws from the global generator
    _add_batch_dim = None

# Seeds of slots nobody seeded (a stack built from a list of models, a row a resize added): a function
# of torch's initial seed and the row, so a seeded script is reproducible and no slot shares another's stream.
_DEFAULT_SEED_STRIDE = 0x9E3779B97F4A7C15  # the golden-ratio increment: adjacent rows get distant seeds


def global_state(device: torch.device | str) -> torch.Tensor:
    """The state of torch's global generator for ``device`` (what a model alone would draw from next)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class SlotRandom:
    """Per-slot generator states of a stack on ``device``: one row of bytes per slot."""

    def __init__(self, num_slots: int, device: torch.device | str):
        self.device = torch.device(device)
        self._scratch = torch.Generator(device=self.device)
        self.states = torch.zeros(num_slots, self._scratch.get_state().numel(), dtype=torch.uint8)
        self._before: dict[int, torch.Tensor] = {}  # row -> state at begin(), for the rows drawn from since
        for i in range(num_slots):
            self.seed(i)

    @property
    def num_slots(self) -> int:
        return self.states.shape[0]

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        return {"random.states": self.states}

    def seed(self, i: int, seed: int | None = None) -> None:
        """Start slot ``i`` from ``torch.manual_seed(seed)``'s state (default: a seed of its own, see above)."""
        if seed is None:
            seed = (torch.initial_seed() + (i + 1) * _DEFAULT_SEED_STRIDE) % (2**63)
        self.states[i] = self._scratch.manual_seed(int(seed)).get_state()
        self._before.pop(i, None)

    def set_state(self, i: int, state: torch.Tensor) -> None:
        """Start slot ``i`` from a generator state (:func:`global_state`, or one :meth:`state` returned)."""
        state = torch.as_tensor(state, dtype=torch.uint8).cpu().flatten().clone()  # never a view (see generator)
        if state.numel() != self.states.shape[1]:
            raise ValueError(f"a generator state of {state.numel()} bytes does not fit this stack's "
                             f"{self.device.type} generators ({self.states.shape[1]} bytes); pass a state taken "
                             f"on the stack's device (ray_modelbatch.slot_random.global_state('{self.device}')).")
        self._scratch.set_state(state)  # refuses a state that is not a generator's
        self.states[i] = state
        self._before.pop(i, None)

    def state(self, i: int) -> torch.Tensor:
        """Slot ``i``'s generator state (a copy)."""
        return self.states[i].clone()

    def copy(self, src: int, dst: int) -> None:
        self.states[dst] = self.states[src]
        self._before.pop(dst, None)

    def resize(self, keep: Sequence[int], capacity: int) -> None:
        """New row ``j`` takes old row ``keep[j]``; rows beyond ``len(keep)`` get seeds of their own."""
        old = self.states
        self.states = torch.zeros(capacity, old.shape[1], dtype=torch.uint8)
        if keep:
            self.states[: len(keep)] = old.index_select(0, torch.as_tensor(list(keep), dtype=torch.long))
        for j in range(len(keep), capacity):
            self.seed(j)
        self._before = {}

    def draws(self, rows: Sequence[int] | torch.Tensor | None = None) -> "Draws":
        """The generators of one forward over ``rows`` (row ``j`` of the forward is slot ``rows[j]``; None:
        every slot in order; a tensor is read only if the forward draws, so a forward without random ops
        never copies a device index to the host)."""
        return Draws(self, rows)

    def begin(self) -> None:
        """Start a step: :meth:`revert` undoes the draws of the forwards from here on (a step of a model in
        parts runs several), and none before."""
        self._before = {}

    def revert(self, rows: Sequence[int] | None = None) -> None:
        """Put ``rows`` (None: all) back to their state at :meth:`begin` (only rows drawn from since move)."""
        for r in (list(self._before) if rows is None else rows):
            before = self._before.pop(int(r), None)
            if before is not None:
                self.states[int(r)] = before

    @property
    def drew(self) -> bool:
        """Whether a forward since :meth:`begin` drew random numbers for any slot (what :meth:`revert` undoes)."""
        return bool(self._before)

    def _commit(self, rows: dict[int, torch.Generator]) -> None:
        for r, g in rows.items():
            if r not in self._before:
                self._before[r] = self.states[r].clone()
            self.states[r] = g.get_state()


class Draws:
    """Per-row generators of one forward; :meth:`commit` writes their states back to the slots."""

    def __init__(self, owner: SlotRandom, rows: Sequence[int] | torch.Tensor | None):
        self.owner, self._rows = owner, rows
        self._gens: dict[int, torch.Generator] = {}

    @property
    def rows(self) -> list[int]:
        if not isinstance(self._rows, list):
            self._rows = (list(range(self.owner.num_slots)) if self._rows is None
                          else [int(r) for r in torch.as_tensor(self._rows).tolist()])
        return self._rows

    def generator(self, j: int) -> torch.Generator:
        """Row ``j``'s generator, at the slot's state (or where this forward's earlier draws left it)."""
        r = self.rows[j]
        g = self._gens.get(r)
        if g is None:
            g = self._gens[r] = torch.Generator(device=self.owner.device)
            state = self.owner.states[r]
            if not bool(state.any()):  # a row restored from before it existed: give it a seed of its own
                self.owner.seed(r)
            g.set_state(self.owner.states[r].clone())  # a row view: torch's set_state misreads an offset view
        return g

    @torch.no_grad()
    def noise(self, x: torch.Tensor, p: float, contiguous: bool = False) -> torch.Tensor:
        """The scaled dropout masks of the slot-first ``x`` (``[n, ...]``, 0 < p < 1), one row per slot.

        Row ``j`` is drawn as ``F.dropout`` draws its mask on the CPU
        (``empty_like(x[j]).bernoulli_(1 - p)``, divided by ``1 - p``) from row
        ``j``'s generator, so ``x * noise`` is ``F.dropout(x[j], p)`` of every
        slot, as one autograd node like a model's own dropout. ``bernoulli_``
        fills memory in order, so the mask follows ``x[j]``'s strides, as the
        model's own follows its tensor's; ``contiguous`` draws in ``x[j]``'s
        logical order instead (a channel-stacked slice, whose model alone
        holds the tensor contiguous).
        """
        if contiguous:
            return self.noise_of_shape(x.shape[1:], p, x.dtype)
        return self._masks(lambda j: torch.empty_like(x[j]), x.shape[0], p)

    def each(self, fn: Callable[..., torch.Tensor], *slices: Sequence[Any]) -> list[torch.Tensor]:
        """``fn(*row_j_args)`` for every row ``j`` with the global generator of the device set to the row's.

        For random ops that take no generator (``scaled_dot_product_attention``
        with ``dropout_p``): each row's call draws what the model's own call
        draws. The global generator is put back afterwards.
        """
        glob = _default_generator(self.owner.device)
        saved = glob.get_state()
        out = []
        try:
            for j, args in enumerate(zip(*slices)):
                g = self.generator(j)
                glob.set_state(g.get_state())
                out.append(fn(*args))
                g.set_state(glob.get_state())
        finally:
            glob.set_state(saved)
        return out

    @torch.no_grad()
    def noise_of_shape(self, shape: Sequence[int], p: float, dtype: torch.dtype) -> torch.Tensor:
        """Scaled masks ``[n, *shape]``, row ``j`` drawn contiguous from row ``j``'s generator."""
        return self._masks(lambda j: torch.empty(tuple(shape), dtype=dtype, device=self.owner.device),
                           len(self.rows), p)

    def _masks(self, empty: Callable[[int], torch.Tensor], n: int, p: float) -> torch.Tensor:
        """``empty(j)`` of every row filled with ``bernoulli_(1 - p)`` from row ``j``'s generator, stacked and
        divided by ``1 - p``: what ``F.dropout`` multiplies by on the CPU."""
        keep = 1.0 - p
        return torch.stack([empty(j).bernoulli_(keep, generator=self.generator(j)) for j in range(n)]).div_(keep)

    def commit(self) -> None:
        """The forward succeeded: its rows' generators are the slots' new states (see :meth:`SlotRandom.revert`).
        Not called for an evaluation: what it drew does not move the slots' streams."""
        if self._gens:
            self.owner._commit(self._gens)


# ------------------------------------------------------------------------------ under torch.vmap
_VMAP = threading.local()  # the vmap levels of ModelBatch's vmapped functions running on this thread
# F.dropout draws one mask element per input element; the feature dropouts one per (sample, channel) of an
# input of this many dims (F.dropout2d's [N, C, H, W]).
_FEATURE_DIMS = {F.dropout1d: 3, F.dropout2d: 4, F.dropout3d: 5}


@contextlib.contextmanager
def vmap_body() -> Iterator[None]:
    """Wraps the body of a ModelBatch function under ``torch.vmap``: marks the level whose rows are the slots."""
    stack = _VMAP.__dict__.setdefault("levels", [])
    stack.append(maybe_current_level() if _add_batch_dim is not None else None)
    try:
        yield
    finally:
        stack.pop()


# Sampling functions a step calls (a GAN's noise, an augmentation): they take a generator; the *_like ones
# are called for the slot's logical shape. Other random functions (torch.normal of tensors, Tensor.uniform_)
# keep vmap's randomness="different", from the global generator.
_SAMPLERS = {torch.randn, torch.rand, torch.randint, torch.randperm}
_LIKE = {torch.randn_like: torch.randn, torch.rand_like: torch.rand}
_RANDOM = frozenset({F.dropout, *_FEATURE_DIMS, *_SAMPLERS, *_LIKE})


class VmapRandom(TorchFunctionMode):
    """While active, dropout and sampling inside a ModelBatch's vmapped function draw each row from ``draws``.

    ``F.dropout(x, p)`` of the slot's logical ``x`` becomes ``x * mask``, the
    masks of all rows drawn outside vmap's transform (one ``[n, *x.shape]``
    tensor) and joined to it as a batched value; ``F.dropout1d/2d/3d`` draw one
    mask element per sample and channel. ``torch.randn/rand/randint/randperm``
    and ``torch.randn_like/rand_like`` are called once per row with the row's
    generator. Calls that are not at the ModelBatch's own vmap level (a user's
    nested vmap), that bring their own ``generator``, or a torch without
    functorch's internals, draw as before, from the global generator.
    """

    def __init__(self, draws: Draws):
        super().__init__()
        self.draws = draws

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func not in _RANDOM:  # nearly every call: as cheap as a mode can be
            return func(*args, **(kwargs or {}))
        kwargs = kwargs or {}
        levels = getattr(_VMAP, "levels", None)
        if (_add_batch_dim is None or not levels or levels[-1] is None or kwargs.get("generator") is not None
                or "out" in kwargs):
            return func(*args, **kwargs)
        level = levels[-1]
        if func is F.dropout or func in _FEATURE_DIMS:
            return self._dropout(func, level, args, kwargs)
        if maybe_current_level() != level:
            return func(*args, **kwargs)  # inside a user's own vmap: its randomness, not ours
        if func in _LIKE:
            x = args[0] if args else kwargs.pop("input")
            sample, args = _LIKE[func], (tuple(x.shape), *args[1:])
            kwargs = {"dtype": x.dtype, "device": x.device, **{k: v for k, v in kwargs.items()
                                                                if k not in ("memory_format", "input")}}
        else:
            sample = func
        with _DisableFuncTorch():
            rows = [sample(*args, **kwargs, generator=self.draws.generator(j)) for j in range(len(self.draws.rows))]
        return _add_batch_dim(torch.stack(rows), 0, level)

    def _dropout(self, func: Any, level: int, args: tuple, kwargs: dict) -> Any:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return func(*args, **kwargs)
        bound = dict(zip(("p", "training", "inplace"), args[1:]), **{k: v for k, v in kwargs.items() if k != "input"})
        p, training = float(bound.get("p", 0.5)), bool(bound.get("training", True))
        if maybe_get_level(x) not in (-1, level) or (func in _FEATURE_DIMS and x.dim() != _FEATURE_DIMS[func]):
            return func(*args, **kwargs)  # a user's inner vmap, or an unbatched feature dropout
        if not training or p == 0.0:
            return x
        if p == 1.0:  # as F.dropout: no draw
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        shape = tuple(x.shape) if func is F.dropout else (*x.shape[:2], *[1] * (x.dim() - 2))
        with _DisableFuncTorch():
            noise = self.draws.noise_of_shape(shape, p, x.dtype)
        return x * _add_batch_dim(noise, 0, level)
