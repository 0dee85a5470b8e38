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
while it is active, every random function of torch's public API called inside
ModelBatch's vmapped function draws each slot's values from the slot's
generator, as the model alone draws them from the global one:

* dropout (``F.dropout``, so ``nn.Dropout``; ``F.dropout1d/2d/3d``,
  ``F.alpha_dropout``, ``F.feature_alpha_dropout``): each slot's mask,
  contiguous in the slot's logical shape, as a model alone draws it for a
  contiguous tensor;
* sampling (``torch.randn/rand/randint/randperm`` and their ``*_like``
  forms, ``torch.normal``, ``torch.bernoulli``, ``torch.multinomial``,
  ``torch.poisson``, ``torch.binomial``, the gamma and Dirichlet kernels):
  one call per slot with the slot's values of the tensor arguments (a
  GAN's noise, a VAE's ``torch.distributions.Normal(mu, sigma).rsample()``);
* in-place fills (``Tensor.normal_``, ``uniform_``, ``bernoulli_``,
  ``exponential_``, ``random_``, ``geometric_``, ``log_normal_``,
  ``cauchy_``) of a tensor that holds a value per slot
  (``torch.empty_like(x).normal_()``), and of the fresh tensors
  ``torch.distributions`` fills and returns. A tensor made inside the step
  (``torch.empty(n).normal_()``) cannot hold a value per slot: vmap refuses
  that fill, and the error says what to write instead.

Functions that draw without taking a generator (``F.gumbel_softmax``,
``F.rrelu`` in training, ``F.multi_head_attention_forward`` and
``F.scaled_dot_product_attention`` with dropout, the fractional max pools)
run once per slot with the global generator set to the slot's, and
``torch.nn.init``'s fills of a per-slot tensor fill each slot's rows. An evaluation draws from each slot's generator without moving it (an
evaluation may run rows that are not being evaluated, and must not change
what the slot draws next in training).

On CUDA the per-slot generator is a CUDA generator and a mask is drawn with
``bernoulli_``, where ``F.dropout`` on CUDA uses a fused kernel that draws
differently: per slot reproducible and independent of the other slots, but
not the bits of the model alone.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .slot_dropout import SlotRate, per_row

try:  # functorch's internals: how a value made outside vmap's transform joins it, one row per slot
    from torch._C import _DisableFuncTorch
    from torch._C._functorch import _add_batch_dim, _unwrap_batched, maybe_current_level, maybe_get_level
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
        if contiguous or x.is_contiguous():  # x[j] contiguous too: the same order, drawn in place (no stack)
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
    def noise_of_shape(self, shape: Sequence[int], p: float, dtype: torch.dtype, scaled: bool = True) -> torch.Tensor:
        """Masks ``[n, *shape]``, row ``j`` drawn contiguous from row ``j``'s generator; divided by ``1 - p``
        unless ``scaled`` is False (the 0/1 masks alpha dropout transforms)."""
        n = len(self.rows)
        out = torch.empty((n, *shape), dtype=dtype, device=self.owner.device)  # each row contiguous
        return self._masks(lambda j: out[j], n, p, scaled, stacked=out)

    def _masks(self, empty: Callable[[int], torch.Tensor], n: int, p: float | Sequence[float],
               scaled: bool = True, stacked: torch.Tensor | None = None) -> torch.Tensor:
        """``empty(j)`` of every row filled with ``bernoulli_(1 - p)`` from row ``j``'s generator and divided
        by ``1 - p`` (what ``F.dropout`` multiplies by on the CPU), stacked; or, where the rows are the rows of
        ``stacked``, that tensor (no copy). ``p`` may give each row its own rate (:mod:`.slot_dropout`); a row at
        rate 0 or 1 draws nothing, as ``F.dropout`` then draws nothing."""
        rows = []
        for j in range(n):
            row = empty(j)
            keep = 1.0 - (p[j] if isinstance(p, (list, tuple)) else p)
            if keep == 1.0:
                row.fill_(1.0)
            elif keep == 0.0:
                row.zero_()
            else:
                row.bernoulli_(keep, generator=self.generator(j))
                if scaled:
                    row.div_(keep)
            rows.append(row)
        return stacked if stacked is not None else torch.stack(rows)

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


# Random functions whose every tensor argument is the slot's value (or one value for all slots): called once
# per row with that row's values and generator (no tensor arguments: the same call per row). The *_like ones
# are called for the slot's logical shape, contiguous, as a model alone draws for a contiguous tensor.
_SAMPLERS = {torch.randn, torch.rand, torch.randint, torch.randperm, torch.normal, torch.bernoulli,
             torch.Tensor.bernoulli, torch.multinomial, torch.Tensor.multinomial, torch.poisson, torch.binomial,
             torch._standard_gamma, torch._sample_dirichlet}
_LIKE = {torch.randn_like: torch.randn, torch.rand_like: torch.rand, torch.randint_like: torch.randint}
# In-place fills: each row's values drawn into a fresh tensor of the slot's shape, then copied into the rows.
_FILLS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.bernoulli_, torch.Tensor.exponential_,
          torch.Tensor.random_, torch.Tensor.geometric_, torch.Tensor.log_normal_, torch.Tensor.cauchy_}
_ALPHA_DROPOUTS = {F.alpha_dropout: False, F.feature_alpha_dropout: True}  # -> feature-wise (as F.dropout2d)
_SELU_ALPHA = 1.7580993408473766  # ATen's alpha dropout constant (Dropout.cpp)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any) -> Any:
    return kwargs[name] if name in kwargs else (args[i] if len(args) > i else default)


def _may_draw(dropout_p: Any) -> bool:
    """Whether a dropout rate may draw: a rate above 0, or a dropout module's rate, which may be above 0 in some
    slots (each row then runs with its own: see _each_row)."""
    return isinstance(dropout_p, SlotRate) or float(dropout_p) > 0


# Functions that draw inside without taking a generator: Python functions whose inner calls this mode never
# sees (a mode is off while it handles a call), and kernels with no generator argument. When they draw
# (the predicate), they run once per row with the device's global generator set to the row's, as the model
# alone runs them: the same bits, one call per slot.
_GLOBAL_DRAWERS: dict[Any, Callable[[tuple, dict], bool]] = {
    F.rrelu: lambda a, k: bool(_arg(a, k, 3, "training", False)),
    torch.rrelu: lambda a, k: bool(_arg(a, k, 3, "training", False)),
    F.gumbel_softmax: lambda a, k: True,
    F.multi_head_attention_forward: lambda a, k: bool(_arg(a, k, 13, "training", True))
    and _may_draw(_arg(a, k, 10, "dropout_p", 0.0)),
    F.scaled_dot_product_attention: lambda a, k: _may_draw(_arg(a, k, 4, "dropout_p", 0.0)),
    **{f: (lambda a, k: _arg(a, k, 5, "_random_samples", None) is None)
       for f in (F.fractional_max_pool2d, F.fractional_max_pool3d,  # what their inner functions hand over
                 F.fractional_max_pool2d_with_indices, F._fractional_max_pool2d,
                 F.fractional_max_pool3d_with_indices, F._fractional_max_pool3d)},
}
# torch.nn.init's fills that hand themselves to this mode (so it never sees the fill inside): run on each row's
# view of the tensor with the row's generator; they return the tensor they filled.
_INITS = {torch.nn.init.uniform_, torch.nn.init.normal_, torch.nn.init.kaiming_uniform_}
_RANDOM = frozenset({F.dropout, *_FEATURE_DIMS, *_SAMPLERS, *_LIKE, *_FILLS, *_ALPHA_DROPOUTS, *_GLOBAL_DRAWERS,
                     *_INITS})


class _Rows:
    """A tensor argument batched at ModelBatch's level, unwrapped: ``value[j]`` is row ``j``'s."""

    __slots__ = ("value",)

    def __init__(self, value: torch.Tensor):
        self.value = value


def _from_distributions(frame: Any) -> bool:
    """Whether the caller is ``torch.distributions``, which fills fresh tensors and uses only the returned one."""
    return frame is not None and str(frame.f_globals.get("__name__", "")).startswith("torch.distributions")


def _join(rows: list[Any], level: int) -> Any:
    """Per-row results as one value batched at ``level`` (tuples element by element; None stays None)."""
    first = rows[0]
    if isinstance(first, torch.Tensor):
        return _add_batch_dim(torch.stack(rows), 0, level)
    if isinstance(first, (tuple, list)):
        return type(first)(_join([r[i] for r in rows], level) for i in range(len(first)))
    return first


class VmapRandom(TorchFunctionMode):
    """While active, random calls inside a ModelBatch's vmapped function draw each row from ``draws``.

    ``F.dropout(x, p)`` of the slot's logical ``x`` becomes ``x * mask``, the
    masks of all rows drawn outside vmap's transform (one ``[n, *x.shape]``
    tensor) and joined to it as a batched value; ``F.dropout1d/2d/3d`` and
    ``F.feature_alpha_dropout`` draw one mask element per sample and channel.
    Samplers are called once per row with the row's values and generator,
    in-place fills of a per-slot tensor fill each row from its generator, and
    functions that draw without a generator argument (``F.gumbel_softmax``,
    ``F.rrelu``, attention with dropout) run once per row with the global
    generator set to the row's (see the module docstring for the list). Calls
    that are not at the ModelBatch's own vmap level (a user's nested vmap),
    that bring their own ``generator`` or ``out``, or a torch without
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
        kwargs.pop("generator", None)  # generator=None, as torch.nn.init passes it: the slot's takes its place
        level = levels[-1]
        if func is F.dropout or func in _FEATURE_DIMS:
            return self._dropout(func, level, args, kwargs)
        if func in _ALPHA_DROPOUTS:
            return self._alpha_dropout(func, level, args, kwargs)
        if maybe_current_level() != level:
            return func(*args, **kwargs)  # inside a user's own vmap: its randomness, not ours
        if func in _GLOBAL_DRAWERS:
            if not _GLOBAL_DRAWERS[func](args, kwargs):
                return func(*args, **kwargs)
            return _join(self._each_row(func, level, args, kwargs, via_global=True), level)
        if func in _FILLS:
            return self._fill(func, level, args, kwargs, sys._getframe(1))
        if func in _INITS:
            target = args[0] if args else kwargs["tensor"]
            if maybe_get_level(target) != level:
                return func(*args, **kwargs)  # a tensor made in the step: its fill fails with fusion_check's line
            self._each_row(func, level, args, kwargs)  # in place, row by row
            return target
        if func in _LIKE:
            x = args[0] if args else kwargs.pop("input")
            rest = args[1:]  # randint_like's [low,] high
            func, args = _LIKE[func], (*rest, tuple(x.shape))
            kwargs = {"dtype": x.dtype, "device": x.device, **{k: v for k, v in kwargs.items()
                                                                if k not in ("memory_format", "input")}}
        return _join(self._each_row(func, level, args, kwargs), level)

    def _each_row(self, func: Any, level: int, args: tuple, kwargs: dict, via_global: bool = False) -> list[Any]:
        """``func`` once per row, outside vmap's transform, with each argument batched at ``level`` replaced by
        the row's value, drawing from the row's generator (passed as ``generator=``, or ``via_global``: set
        as the device's global generator for the call)."""
        def rows_of(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and maybe_get_level(v) == level:
                value, bdim = _unwrap_batched(v, level)
                return _Rows(value.movedim(bdim, 0))
            if isinstance(v, SlotRate):  # a dropout module's p (an SDPA's dropout_p): each row's own rate
                rate = per_row(v, lambda: self.draws.rows)
                return _Rows(rate) if isinstance(rate, list) else rate
            return v

        args = tuple(rows_of(v) for v in args)
        kwargs = {k: rows_of(v) for k, v in kwargs.items()}
        pick = lambda v, j: v.value[j] if isinstance(v, _Rows) else v  # noqa: E731

        def call(j: int, **extra: Any) -> Any:
            return func(*(pick(v, j) for v in args), **{k: pick(v, j) for k, v in kwargs.items()}, **extra)

        rows = range(len(self.draws.rows))
        with _DisableFuncTorch():
            if via_global:
                return self.draws.each(call, rows)
            return [call(j, generator=self.draws.generator(j)) for j in rows]

    def _fill(self, func: Any, level: int, args: tuple, kwargs: dict, caller: Any) -> Any:
        target = args[0] if args else kwargs.pop("self")
        per_slot = maybe_get_level(target) == level
        if not per_slot and not _from_distributions(caller):
            # A tensor made inside the step holds one value for every slot: vmap refuses to fill it with
            # different values, in an error fusion_check explains (draw with torch.randn(...) instead).
            return func(target, *args[1:], **kwargs)
        shape, dtype, device = tuple(target.shape), target.dtype, target.device

        def fill(*rest: Any, **kw: Any) -> torch.Tensor:  # a fresh tensor of the slot's shape, as alone
            return func(torch.empty(shape, dtype=dtype, device=device), *rest, **kw)

        batched = _join(self._each_row(fill, level, args[1:], kwargs), level)
        if per_slot:
            return target.copy_(batched)
        return batched  # torch.distributions uses the returned tensor only

    def _dropout(self, func: Any, level: int, args: tuple, kwargs: dict) -> Any:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return func(*args, **kwargs)
        bound = dict(zip(("p", "training", "inplace"), args[1:]), **{k: v for k, v in kwargs.items() if k != "input"})
        training = bool(bound.get("training", True))
        if maybe_get_level(x) not in (-1, level) or (func in _FEATURE_DIMS and x.dim() != _FEATURE_DIMS[func]):
            return func(*args, **kwargs)  # a user's inner vmap, or an unbatched feature dropout
        if not training:
            return x
        p = per_row(bound.get("p", 0.5), lambda: self.draws.rows)  # one rate, or each row's (slot_dropout)
        if p == 0.0:
            return x
        if p == 1.0:  # as F.dropout: no draw
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        with _DisableFuncTorch():
            if func is F.dropout:  # bernoulli_ fills memory in order: each row's mask follows its tensor's strides
                if maybe_get_level(x) == level:
                    value, bdim = _unwrap_batched(x, level)
                    rows = value.movedim(bdim, 0)
                else:  # the same tensor in every slot (no slot dimension): each row's mask is shaped as it
                    rows = x.unsqueeze(0).expand(len(self.draws.rows), *x.shape)
                noise = self.draws.noise(rows, p)
            else:  # a feature dropout's mask is [N, C, 1, ...], drawn contiguous (ATen's make_feature_noise)
                noise = self.draws.noise_of_shape((*x.shape[:2], *[1] * (x.dim() - 2)), p, x.dtype)
        return x * _add_batch_dim(noise, 0, level)

    def _alpha_dropout(self, func: Any, level: int, args: tuple, kwargs: dict) -> Any:
        """``F.alpha_dropout`` / ``F.feature_alpha_dropout`` with each row's mask: ATen's arithmetic
        (``Dropout.cpp``) on a mask drawn as the model alone draws it."""
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return func(*args, **kwargs)
        bound = dict(zip(("p", "training", "inplace"), args[1:]), **{k: v for k, v in kwargs.items() if k != "input"})
        p, training = float(bound.get("p", 0.5)), bool(bound.get("training", False))
        if maybe_get_level(x) not in (-1, level) or (_ALPHA_DROPOUTS[func] and x.dim() < 2):
            return func(*args, **kwargs)
        if not training or p == 0.0 or x.numel() == 0:
            return x
        if p == 1.0:
            return x * torch.zeros((), dtype=x.dtype, device=x.device)
        shape = (*x.shape[:2], *[1] * (x.dim() - 2)) if _ALPHA_DROPOUTS[func] else tuple(x.shape)
        with _DisableFuncTorch():
            noise = self.draws.noise_of_shape(shape, p, x.dtype, scaled=False)
            a = 1.0 / math.sqrt((_SELU_ALPHA * _SELU_ALPHA * p + 1) * (1 - p))
            b = noise.add(-1).mul_(_SELU_ALPHA * a).add_(_SELU_ALPHA * a * p)
            noise.mul_(a)
        return x * _add_batch_dim(noise, 0, level) + _add_batch_dim(b, 0, level)
