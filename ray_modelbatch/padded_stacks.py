"""Padded stacks: models that differ only in layer widths train in one stack.

Why. A sweep's search space often holds widths: Tune's CIFAR tutorial
searches the two hidden widths ``l1`` and ``l2`` of its CNN over four values
each. Models of different widths have tensors of different shapes, so each
width pair took a stack of its own: 20 trials of that tutorial made 16 stacks
of about one slot, nothing fused, and the sweep ran slower than plain Tune.

How. A padded stack's tensors take, dimension by dimension, the largest
size of its members; its template is a model of those sizes. A slot whose
model is narrower holds its own weights in the leading block of each tensor
and zeros in the rest. A hidden unit whose weights in and out are zero and
whose activation maps 0 to 0 (ReLU, GELU, tanh, max-pool) changes nothing:
its products are exact zeros, its gradients are exact zeros, and an
optimizer moves no parameter whose gradient, state and value are all zero.
So the slot computes what its model computes alone, up to the order in
which a GEMM sums its (now longer, zero-padded) rows.

That is not so for every model: a LayerNorm or a softmax over a padded
dimension, a sigmoid whose 0.5 reaches the next layer's padded inputs, or a
dropout that draws its masks over the padded shape all change the numbers.
So a model joins a padded stack only after :func:`check` ran it both ways on
real inputs: the padded model's outputs and its own block's gradients match
the model's own to float rounding, in training and evaluation mode, and the
padded entries' gradients and buffers are exactly zero. Otherwise it gets a
stack of its own sizes, as before. Only the sizes of layers whose width
attributes this module knows (:data:`SIZE_ATTRIBUTES`) may differ; any other
difference in a module's settings still splits stacks.

A padded slot computes at the stack's sizes, so :func:`check` also counts
the forward's FLOPs both ways; a host admits a model where its padded FLOPs
are at most :data:`MAX_WASTE` times its own (a CNN whose convolutions are
fixed and whose hidden widths are searched pads almost for free), or where
padding adds at most :data:`SMALL_EXTRA_FLOPS` to a training step: a small
model's fused step is its fixed cost, and one stack steps once where two
step twice (:func:`worth_it`).

A slot's checkpoint holds its model at its own sizes (:func:`unpad`,
:func:`unpad_flat`): it loads into ``model_factory(config)`` and restores into
any stack it fits.
"""

from __future__ import annotations

import copy
import dataclasses
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from .signature import Signature, TensorSpec, module_settings, module_signature

MAX_WASTE = 1.5  # a model joins a padded stack where its FLOPs there are at most this many times its own

SMALL_EXTRA_FLOPS = 4e6
"""A model also joins a padded stack where padding adds at most this many FLOPs to each of its training steps,
whatever the ratio to its own (:data:`MAX_WASTE`).

A small model's fused step costs its fixed work (dispatch, Python, the
optimizer's per-step bookkeeping), not its arithmetic: for the MLP sweep of
``benchmarks/tune_sweep.py`` (64-32-10 and 64-128-10, batch 64) a 32-wide slot
in the 128-wide stack does 2.7 MFLOP more a step, a few tens of microseconds
of one core, while the two widths in stacks of their own took two fused steps
where one stack takes one. Measured there (16 alternating pairs, 2-core AMD
EPYC, a noisy machine): 23.6 against 25.6 ms per trial-iteration (medians; 11
pairs of 16 faster), with 10.5 slots a fused step instead of 5.5. Counted as
three forwards of one batch (forward, and the backward's two products). On a
GPU, where such steps are launch-bound, the same budget is conservative."""

Shapes = dict[str, tuple[int, ...]]


def _conv_sizes(m: nn.Module) -> dict[str, tuple[str, int]]:
    if m.groups != 1:  # grouped convolutions: in_channels counts groups, not one dimension
        return {}
    transposed = bool(getattr(m, "transposed", False))
    return {"in_channels": ("weight", 0 if transposed else 1), "out_channels": ("weight", 1 if transposed else 0)}


def _norm_sizes(m: nn.Module) -> dict[str, tuple[str, int]]:
    owner = "weight" if m.weight is not None else "running_mean" if m.running_mean is not None else None
    return {} if owner is None else {"num_features": (owner, 0)}


# Module width attributes, by the tensor dimension each one is: these may differ within a padded stack.
SIZE_ATTRIBUTES: tuple[tuple[type, Any], ...] = (
    (nn.Linear, lambda m: {"in_features": ("weight", 1), "out_features": ("weight", 0)}),
    (nn.modules.conv._ConvNd, _conv_sizes),
    (nn.modules.batchnorm._BatchNorm, _norm_sizes),
    (nn.Embedding, lambda m: {"num_embeddings": ("weight", 0), "embedding_dim": ("weight", 1)}),
)


def size_attributes(module: nn.Module) -> dict[str, tuple[str, int]]:
    """``{attribute: (own tensor name, dimension)}`` of the width attributes of one module (not its children)."""
    for kind, sizes in SIZE_ATTRIBUTES:
        if isinstance(module, kind):
            return sizes(module)
    return {}


def sized_settings(model: nn.Module) -> set[tuple[str, str]]:
    """``(module path, attribute)`` of every width attribute in ``model`` (see :data:`SIZE_ATTRIBUTES`)."""
    return {(path, a) for path, m in model.named_modules() for a in size_attributes(m)}


def unsized_settings(model: nn.Module) -> tuple:
    """:func:`~ray_modelbatch.signature.module_settings` without the width attributes a padded stack may vary."""
    sized = sized_settings(model)
    return tuple(s for s in module_settings(model) if (s[0], s[1]) not in sized)


def family_key(model: nn.Module) -> str:
    """Equal for two models that a padded stack may hold together: the same tree, settings and tensors
    except for their sizes (each tensor's number of dimensions still counts)."""
    tensors = tuple((s.name, s.kind, len(s.shape), s.dtype, s.requires_grad) for s in module_signature(model))
    structure = [(name, type(m).__qualname__) for name, m in model.named_modules()]
    text = repr((type(model).__module__, tensors, structure, unsized_settings(model)))
    return f"{type(model).__name__}~{zlib.crc32(text.encode()):08x}"


def own_shapes(stack: Signature, model: Signature) -> Shapes | None:
    """The tensors of ``model`` that are smaller than the stack's, by name, at their own shapes: ``{}`` when
    every shape is the stack's, None when ``model`` does not fit (another tensor, dtype, rank or a larger size)."""
    if len(stack) != len(model):
        return None
    out: Shapes = {}
    for s, m in zip(stack, model):
        if (s.name, s.kind, s.dtype, s.requires_grad, len(s.shape)) != (m.name, m.kind, m.dtype, m.requires_grad,
                                                                       len(m.shape)):
            return None
        if any(a > b for a, b in zip(m.shape, s.shape)):
            return None
        if m.shape != s.shape:
            out[s.name] = tuple(m.shape)
    return out


def widest(shapes: Mapping[str, Sequence[int]], other: Signature) -> Shapes:
    """The larger size of each dimension of ``shapes`` (by tensor name) and of a signature of the same family."""
    return {s.name: tuple(max(p, q) for p, q in zip(shapes[s.name], s.shape)) for s in other}


def _block(shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape)


def pad(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``t`` in the leading block of a zero tensor of ``shape``."""
    if tuple(t.shape) == tuple(shape):
        return t
    out = torch.zeros(tuple(shape), dtype=t.dtype, device=t.device)
    out[_block(t.shape)] = t
    return out


def unpad(t: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The leading block of ``t`` of ``shape`` (a copy)."""
    return t[_block(shape)].clone()


def has_ties(model: nn.Module) -> bool:
    """Whether a tensor of ``model`` is reached under two names (a padded copy would untie it)."""
    params = list(model.named_parameters(remove_duplicate=False))
    buffers = list(model.named_buffers(remove_duplicate=False))
    return len(params) != len({id(p) for _, p in params}) or len(buffers) != len({id(b) for _, b in buffers})


@torch.no_grad()
def pad_model(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> nn.Module:
    """A copy of ``model`` whose tensors named in ``shapes`` are zero-padded to those shapes, its layers'
    width attributes set to match: a model of the stack's sizes that computes what ``model`` computes."""
    out = copy.deepcopy(model)
    for path, module in out.named_modules():
        sizes = size_attributes(module)
        prefix = f"{path}." if path else ""
        grown: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for local, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if t is None or f"{prefix}{local}" not in shapes:
                continue
            new = tuple(shapes[f"{prefix}{local}"])
            grown[local] = (tuple(t.shape), new)
            value = pad(t.detach(), new)
            if isinstance(t, nn.Parameter):
                setattr(module, local, nn.Parameter(value, requires_grad=t.requires_grad))
            else:
                module._buffers[local] = value
        for attribute, (local, dim) in sizes.items():
            if local in grown:
                setattr(module, attribute, grown[local][1][dim])
    return out


def _flat_parts(flat: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    out, at = [], 0
    for sh in shapes:
        n = int(torch.Size(sh).numel())
        out.append(flat[at: at + n].view(tuple(sh)))
        at += n
    return out


def unpad_flat(flat: torch.Tensor, names: Sequence[str], shapes: Sequence[Sequence[int]],
               own: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """One slot's flat per-dtype buffer (the stack's layout: ``names`` at ``shapes``) at the model's own sizes."""
    return torch.cat([unpad(p, own[n]).reshape(-1) if n in own else p.reshape(-1)
                      for n, p in zip(names, _flat_parts(flat, shapes))]) if names else flat.clone()


def pad_flat(flat: torch.Tensor, names: Sequence[str], shapes: Sequence[Sequence[int]],
             own: Mapping[str, Sequence[int]]) -> torch.Tensor:
    """The inverse of :func:`unpad_flat`: a flat buffer at the model's own sizes in the stack's layout."""
    own_shapes = [tuple(own.get(n, sh)) for n, sh in zip(names, shapes)]
    return torch.cat([pad(p, sh).reshape(-1) for p, sh in zip(_flat_parts(flat, own_shapes), shapes)]) \
        if names else flat.clone()


@dataclass(frozen=True)
class Verdict:
    """Whether a model may join a padded stack (:func:`check`), and what it would cost there."""

    ok: bool
    waste: float = 1.0  # the padded forward's FLOPs over the model's own
    reason: str = ""
    extra_flops: float = float("inf")  # the padded forward's FLOPs minus the model's own, on the check's inputs


class _FlopCount(TorchDispatchMode):
    """The FLOPs of the matmuls and convolutions run under it, by torch's own formulas
    (``torch.utils.flop_counter.flop_registry``), as ``FlopCounterMode`` counts them.

    Why not ``FlopCounterMode`` itself: a ``TorchDispatchMode`` subclass's dispatch
    is wrapped to skip Dynamo, and that wrapper imports ``torch._dynamo`` the first
    time it runs: 0.87 CPU-s on a 2-core Xeon, in every slot host, at its first
    padded attach (or on a thread beside its start, competing with the sweep's own).
    This mode is never compiled, so it opts out of the wrapper."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry, self.total = flop_registry, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        if (func not in self.registry and func._overloadpacket not in self.registry
                and func is not torch.ops.prim.device.default):
            with self:  # a composite op without a formula: count the ops it is made of
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def _flops(run: Callable[[nn.Module], Any], model: nn.Module) -> tuple[Any, int]:
    counter = _FlopCount()
    with counter:
        out = run(model)
    return out, counter.total


Run = tuple[bool, Callable[[nn.Module], Any]]  # (training mode, what to compute with a model)


def forward_runs(x: Any) -> list[Run]:
    """The model's forward on ``x``, in training and in evaluation mode: what :func:`check` compares when the
    library's own steps train the stack (its loss and metrics are functions of the outputs)."""
    return [(True, lambda m: m(x)), (False, lambda m: m(x))]


def _close(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> bool:
    """Equal to float rounding: within 1e-5 of ``scale`` (default: ``a``'s largest value; for gradients, the
    largest of the model's, since a gradient that is 0 in exact arithmetic is rounding noise either way)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    if scale is None:
        scale = float(a.detach().abs().max()) if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), equal_nan=True))


def _outside(own: Sequence[int], shape: Sequence[int], device: Any = "cpu") -> torch.Tensor:
    """A mask of ``shape``: True outside the leading block of ``own`` (the padded entries)."""
    inside = torch.zeros(tuple(shape), dtype=torch.bool, device=device)
    inside[_block(own)] = True
    return ~inside


def check(model: nn.Module, shapes: Mapping[str, Sequence[int]], stack_settings: tuple, runs: Sequence[Run],
          seed: int = 0) -> Verdict:
    """Whether ``model``, zero-padded to ``shapes``, computes exactly what it computes alone (see the
    module docstring); and its padded FLOPs over its own.

    ``runs`` say what to compare: ``(training, fn)`` pairs, ``fn(model)`` the
    forward on example inputs (:func:`forward_runs`) or a user's own step on
    an example batch; each training run's result is also backpropagated, and
    the first one's FLOPs are counted. ``stack_settings`` are the stack
    template's :func:`unsized_settings`. Neither ``model`` nor the global random
    state changes.
    """
    if unsized_settings(model) != stack_settings:
        return Verdict(False, reason="a setting other than a layer width differs")
    if has_ties(model):
        return Verdict(False, reason="the model shares a tensor between layers")
    try:
        own = copy.deepcopy(model)
        padded = pad_model(model, shapes)
        named = dict(own.named_parameters())
        reach = dict(padded.named_parameters())
        flops: list[int] = []
        cuda = sorted({t.device.index or 0 for t in own.parameters() if t.is_cuda})
        for training, run in runs:
            outs = []
            for m in (own, padded):
                m.train(training)
                with torch.random.fork_rng(devices=cuda):
                    torch.manual_seed(seed)
                    out, f = _flops(run, m)
                outs.append([t for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
                if training and len(flops) < 2:
                    flops.append(f)
            a, b = outs
            if not a or len(a) != len(b) or not all(_close(p, q) for p, q in zip(a, b)):
                return Verdict(False, reason="its padded outputs differ from its own")
            if training:
                g = torch.Generator(device="cpu").manual_seed(seed)
                weights = [torch.randn(t.shape, generator=g).to(t.device, t.dtype) for t in a]
                for m, leaves in ((own, a), (padded, b)):
                    m.zero_grad(set_to_none=True)
                    total = sum((t * w).sum() for t, w in zip(leaves, weights) if t.is_floating_point()
                                and t.requires_grad)
                    if isinstance(total, torch.Tensor):
                        total.backward()
                grads = [p.grad for p in named.values() if p.grad is not None]
                scale = max((float(g.abs().max()) for g in grads if g.numel()), default=0.0)
                for name, p in named.items():
                    q = reach[name]
                    if (p.grad is None) != (q.grad is None):
                        return Verdict(False, reason=f"'{name}' gets a gradient only one way")
                    if p.grad is None:
                        continue
                    if not _close(p.grad, unpad(q.grad, p.shape), scale):
                        return Verdict(False, reason=f"the gradient of '{name}' differs")
                    if p.shape != q.shape and bool(q.grad[_outside(p.shape, q.shape, q.grad.device)].any()):
                        return Verdict(False, reason=f"the padded entries of '{name}' get a gradient")
        mine = dict(own.named_buffers())
        for name, b in padded.named_buffers():
            if not _close(mine[name], unpad(b, mine[name].shape)) or (
                    mine[name].shape != b.shape and bool(b[_outside(mine[name].shape, b.shape, b.device)].any())):
                return Verdict(False, reason=f"buffer '{name}' differs")
    except Exception as exc:  # noqa: BLE001 - a model that fails padded is simply not padded
        return Verdict(False, reason=f"the padded model fails: {type(exc).__name__}: {exc}")
    own_flops, padded_flops = flops if len(flops) == 2 else (0, 0)
    extra = float(padded_flops - own_flops) if own_flops else float("inf")
    if not own_flops:  # no matmul or convolution (lookups, elementwise): by parameter count
        own_flops = sum(p.numel() for p in own.parameters())
        padded_flops = sum(p.numel() for p in padded.parameters())
    return Verdict(True, waste=padded_flops / own_flops if own_flops else 1.0, extra_flops=extra)


def worth_it(verdict: Verdict | None, rows: int, batch_size: int) -> bool:
    """Whether a model whose :func:`check` ran on ``rows`` examples joins the padded stack, trained on batches
    of ``batch_size``: it pads exactly, and either its FLOPs there are at most :data:`MAX_WASTE` times its own
    or padding adds at most :data:`SMALL_EXTRA_FLOPS` to each of its training steps."""
    if verdict is None or not verdict.ok:
        return False
    return verdict.waste <= MAX_WASTE or 3 * verdict.extra_flops * batch_size / max(rows, 1) <= SMALL_EXTRA_FLOPS


def describe(spec: TensorSpec, shape: Sequence[int] | None) -> str:
    """``spec.describe()`` at a slot's own ``shape`` (a checkpoint's signature line)."""
    return (spec if shape is None else dataclasses.replace(spec, shape=tuple(shape))).describe()
