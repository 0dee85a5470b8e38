"""Direct batched kernels for the common layers, so small models skip ``torch.vmap``.

``torch.vmap`` pays a per-op cost that dominates small models (an MLP step
is ~90 batched ops), and on CPU it runs convolutions about as fast as a loop.
For models built from the layers below, the whole forward is written on the
stacked parameters directly:

* every ``nn.Linear`` is one batched GEMM over the slots, ``[S, B*, I] @ [S, I, O]``
  (a batch shared by every slot is broadcast with stride 0, never copied;
  ``B*`` is every leading dimension, e.g. batch and sequence), read straight
  from the strided parameter views of the flat ``[S, P]`` buffer; its backward
  is two batched GEMMs;
* every ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d``
  is one convolution over all slots: the slots' channels side by side
  (``[B, S*C, H, W]``) and ``groups`` multiplied by S, as HFTA fuses them; on a
  batch shared by every slot the first convolution needs no groups at all
  (``S*O`` output channels of one input);
* ``nn.BatchNorm1d/2d/3d`` is one ``F.batch_norm`` over the ``S*C`` channels,
  whose running statistics are views of the stacked buffers (on a CPU's
  channels-last activations, with sums as accurate as each model's own:
  :mod:`.channels_last_batch_norm`); a ReLU whose input nothing else reads
  overwrites it (:func:`_relu_in_place`); ``nn.GroupNorm``
  with G groups is one ``F.group_norm`` of ``S*G`` groups (each slot's groups
  are its own channels; on a CPU's channels-last activations, where torch's
  kernel is slow, :mod:`.channels_last_group_norm`) and
  ``nn.InstanceNorm1d/2d/3d`` one ``F.instance_norm``;
  pooling (the modules and ``F.max_pool2d``-style functions), upsampling
  (``nn.Upsample``, ``F.interpolate``) and the pixel shuffles act per channel
  as they are: a CNN stays in the channel-stacked layout from its first
  convolution to its flatten, with no copies between layers;
* ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.Embedding`` and ``nn.EmbeddingBag`` (sum, mean) are
  one kernel over all slots each (see :mod:`.direct_kernels`);
  ``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention`` run attention once on the slots folded
  into the batch (see :mod:`.direct_attention`), and so do ``nn.Transformer`` and its encoder and decoder
  layers and stacks (see :mod:`.direct_transformer`);
* ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (the stack's ``UnrolledRNN``) run each
  layer and direction as one batched GEMM and the gate math per time step
  (a GRU after one batched GEMM for the input projection of the whole
  sequence), with a hand-written backward through time (see :mod:`.direct_rnn`);
* activations are elementwise, so they act per slot as they are
  (``nn.PReLU`` with each slot's weight, per channel or one); dropout
  (and the channel dropouts ``nn.Dropout1d/2d/3d``, one mask value per sample
  and channel) draws each slot's mask from that slot's own generator, in the
  order and shape its model draws it (:mod:`.slot_random`, :meth:`_Runner.dropout`,
  attention dropout per slot in :mod:`.direct_attention`); so do ``+``,
  ``*`` and the other binary ops between any two values (residual
  connections), comparisons, ``clamp``, ``maximum``/``minimum`` and
  ``where``, which broadcast as each model's own tensors do, and elementwise
  functions (``sin``, ``erf``, ``square``, ``zeros_like``, ...);
* ``matmul``/``@``, ``einsum`` (the slot as one more index), ``softmax``,
  ``mean``/``sum``, ``max``/``min`` (along a dimension, of a whole value, or
  of two values), ``amax``/``amin``, ``logsumexp``, ``cumsum``,
  ``masked_fill``, ``one_hot``, ``expand``, ``cat``/``stack``,
  ``transpose``/``permute``, ``view``/``reshape``/``flatten``/``unflatten``
  (``nn.Unflatten`` too), ``unfold`` (patches), ``chunk``, ``triu``/``tril``, ``F.normalize``, ``F.glu``,
  indexing and ``x.shape`` act on each slot's value with its dimensions
  counted after the slot dimension: one call for all slots;
* tensors made from sizes and constants (``torch.full``, ``zeros``, ``ones``,
  ``arange``, ``eye``, ``x.new_zeros``: a causal mask from
  ``generate_square_subsequent_mask``, positions from ``arange``) are made
  once, shared by every slot; noise drawn
  in forward (``randn_like``, ``rand_like``, ``randn``/``rand`` of a size: a
  VAE's reparameterized sample) is drawn per slot from the slot's generator.

The traced forward is a graph, not a chain: a step may read any earlier
values, the model may take more inputs than ``x`` (``offsets``, masks), and
it may return several tensors (a tuple, list or dict of them: each comes back
with its leading slot dimension, as vmap returns them).

On CPU, ``gemm="onednn"`` runs the large GEMMs (weights of at least
:data:`DIRECT_WRITE_MIN` elements) through oneDNN instead of the BLAS that
``torch.bmm`` uses: one slot at a time, or, for a layer whose input every slot
shares (a sweep's first layer: one batch for all models), as one GEMM of the
batch against all slots' weights for the forward and one for the weight
gradients. Where the BLAS does not use the CPU's widest vector units (MKL on
AMD CPUs runs its AVX2 code, oneDNN its AVX-512 code) that is up to 2x faster
per GEMM (the 784-256-256-10 MLP's first layer at 32 slots on a 2-core EPYC:
forward 2.6 against 5.2 ms, weight gradient 2.2 against 5.4 ms; the step
12-17% faster with the copies of the weights and gradients it takes). The
results are fp32-accurate but not bitwise those of ``nn.Linear``, so Adam,
which turns rounding in near-zero gradients into steps of size lr, drifts
apart from a solo run sooner; hence opt-in.

With ``grads=`` (the engine's training step, see
:meth:`ModelBatch.gradients_into_buffer`) the backward GEMMs write each weight
and bias gradient straight into its view of the flat gradient buffer that the
optimizers read: no gradient tensor is allocated, handed to autograd, or
copied afterwards. For large stacks that saves a full pass over every
gradient (as much memory traffic as an SGD update).

:func:`plan` traces the model with ``torch.fx``; any module, function or
shape it does not know returns ``None`` (or raises :class:`Unsupported` at
run time), and :class:`~ray_modelbatch.ModelBatch` then uses ``vmap``. The
math per slot is the model's own, so results match to float rounding.
A plan whose steps are all *gather-exact* (Linear, elementwise and binary
ops, embedding lookups, and steps that only move data) is gather-exact as a
whole: running any two or more of the slots gives each the bits it gets in
the whole stack (:attr:`FastPlan.gather_exact`; a stack with ``gemm="onednn"``
is not, see :attr:`ModelBatch.gather_exact`). Convolution and
normalization kernels may pick another algorithm for another number of
channels, and reductions, softmax, attention and recurrent layers another
blocking for another number of rows, so plans with them are not (see
:data:`GATHER_EXACT_KINDS`).
"""

from __future__ import annotations

import copy
import inspect
import operator
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_aggregate

from . import (channels_last_batch_norm, channels_last_group_norm, conv_precision, padded_channel_conv,
               shared_input_conv, short_softmax, strided_gemm, strided_pointwise_conv)
from . import direct_attention as attention
from . import direct_transformer
from . import hf
from . import direct_kernels as kernels
from . import direct_rnn as recurrent
from .direct_kernels import CHAN, SHARED, SLOT, Act, Unsupported
from .signature import MODULE_HOOKS, hook_kind
from .slot_dropout import per_row
from .stacked_embedding import StackedEmbedding
from .stacked_layer_norm import StackedLayerNorm
from .unrolled_rnn import UnrolledRNN, UnrolledRNNCell

__all__ = ["FastPlan", "GradTarget", "Unsupported", "plan", "run", "onednn_available", "DIRECT_WRITE_MIN",
           "STRIDED_GEMM_MIN_SLOTS", "GEMMS"]

ELEMENTWISE_MODULES = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus,
                       nn.Identity, nn.Dropout, nn.Mish, nn.Hardtanh, nn.ReLU6, nn.SELU, nn.CELU, nn.Hardswish,
                       nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Softshrink, nn.Hardshrink)
ELEMENTWISE_FUNCTIONS = {torch.relu, torch.tanh, torch.sigmoid, torch.exp, torch.log, torch.sqrt, torch.rsqrt,
                         torch.abs, torch.neg, operator.neg, F.relu, F.gelu, F.silu, F.tanh, F.sigmoid, F.softplus,
                         F.leaky_relu, F.elu, F.mish, F.dropout, F.selu, torch.selu, F.celu, F.hardswish,
                         F.hardsigmoid, F.logsigmoid, F.softsign, F.relu6, F.hardtanh, F.tanhshrink, F.softshrink,
                         F.hardshrink, torch.sin, torch.cos, torch.erf, torch.square, torch.log1p, torch.expm1,
                         torch.reciprocal, torch.sign, torch.zeros_like, torch.ones_like, torch.full_like}
ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "exp", "log", "sqrt", "rsqrt", "abs", "neg", "contiguous",
                       "float", "clone", "sin", "cos", "erf", "square", "log1p", "expm1", "reciprocal", "sign"}
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FNS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d, nn.ConvTranspose1d: F.conv_transpose1d,
             nn.ConvTranspose2d: F.conv_transpose2d, nn.ConvTranspose3d: F.conv_transpose3d}
# The rank of each convolution's input, with the batch dimension.
_CONV_RANKS = {nn.Conv1d: 3, nn.ConvTranspose1d: 3, nn.Conv2d: 4, nn.ConvTranspose2d: 4, nn.Conv3d: 5,
               nn.ConvTranspose3d: 5}
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Normalizations over each sample's own channels (no running statistics): one call over the S*C channels.
GROUP_NORM_MODULES = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# Dropout of whole channels -> the rank of the input it takes (with the batch dimension), as F.dropout1d/2d/3d.
FEATURE_DROPOUTS = {nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5, F.dropout1d: 3, F.dropout2d: 4, F.dropout3d: 5}
# Per-channel ops: they act on a [B, S*C, ...] tensor exactly as on each slot's [B, C, ...]. (Pixel shuffles
# move values between channels, but only within blocks of r*r consecutive ones, which never straddle slots.)
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.MaxPool3d, nn.AvgPool3d,
                nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.Upsample,
                nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.PixelUnshuffle)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
             nn.AdaptiveMaxPool3d)  # see _pool_before_relu
# The functional forms, -> (rank of their input with the batch dimension, None: any from 3; the position of
# return_indices among the arguments after the input, None: ops that have none).
POOL_FUNCTIONS = {F.max_pool1d: (3, 5), F.max_pool2d: (4, 5), F.adaptive_max_pool1d: (3, 1),
                  F.adaptive_max_pool2d: (4, 1), F.avg_pool1d: (3, None), F.avg_pool2d: (4, None),
                  F.adaptive_avg_pool1d: (3, None), F.adaptive_avg_pool2d: (4, None), F.max_pool3d: (5, 5),
                  F.adaptive_max_pool3d: (5, 1), F.avg_pool3d: (5, None), F.adaptive_avg_pool3d: (5, None),
                  F.interpolate: (None, None),
                  F.pixel_shuffle: (4, None), F.pixel_unshuffle: (4, None)}
EMBEDDING_MODULES = (nn.Embedding, StackedEmbedding)  # the stack's template has StackedEmbedding (stack_embeddings)
LAYER_NORM_MODULES = (nn.LayerNorm, StackedLayerNorm)  # ... and StackedLayerNorm (stack_layer_norms)
RNN_MODULES = (UnrolledRNN, nn.LSTM, nn.GRU, nn.RNN)  # the stack's template has UnrolledRNN for the others

# Tensors made from sizes and constants alone (a causal mask: ``nn.Transformer.generate_square_subsequent_mask``
# is ``triu(full(...))``): the same for every slot. Random ones (``torch.randn(size)``) are not among them.
CREATE_FUNCTIONS = (torch.full, torch.zeros, torch.ones, torch.empty, torch.arange, torch.eye, torch.tensor)

# Noise drawn in forward (a VAE's reparameterized sample): each slot draws its model's own numbers.
RANDOM_LIKE = {torch.randn_like: torch.randn, torch.rand_like: torch.rand}

# call_function targets and call_method names -> step kind (see _Runner for each kind's layout rules)
FUNCTION_KINDS: dict[Any, str] = {
    **{f: "function" for f in ELEMENTWISE_FUNCTIONS},
    **{f: "binary" for f in (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                              torch.mul, torch.div, torch.clamp, torch.clip, torch.maximum, torch.minimum,
                              torch.where, operator.gt, operator.lt, operator.ge, operator.le, operator.eq,
                              operator.ne, torch.gt, torch.lt, torch.ge, torch.le, torch.eq, torch.ne)},
    operator.pow: "power", torch.pow: "power",
    operator.matmul: "matmul", torch.matmul: "matmul", torch.bmm: "matmul",
    torch.cat: "cat", torch.concat: "cat", torch.stack: "cat",
    torch.mean: "reduce", torch.sum: "reduce", torch.amax: "reduce", torch.amin: "reduce",
    torch.logsumexp: "reduce", torch.cumsum: "reduce", torch.max: "extremum", torch.min: "extremum",
    torch.masked_fill: "binary", torch.einsum: "einsum", F.one_hot: "function",
    torch.softmax: "softmax", torch.log_softmax: "softmax", F.softmax: "softmax", F.log_softmax: "softmax",
    torch.transpose: "transpose", torch.permute: "permute", torch.flatten: "flatten", torch.reshape: "view",
    torch.unsqueeze: "unsqueeze", torch.squeeze: "squeeze", torch.chunk: "split", torch.split: "split",
    F.scaled_dot_product_attention: "sdpa", operator.getitem: "getitem", getattr: "getattr",
    F.dropout1d: "feature_dropout", F.dropout2d: "feature_dropout", F.dropout3d: "feature_dropout",
    **{f: "pool_function" for f in POOL_FUNCTIONS},
    **{f: "create" for f in CREATE_FUNCTIONS}, torch.triu: "triangle", torch.tril: "triangle",
    F.normalize: "normalize", **{f: "random" for f in (*RANDOM_LIKE, *RANDOM_LIKE.values())}, F.glu: "glu",
}
METHOD_KINDS: dict[str, str] = {
    **{m: "function" for m in ELEMENTWISE_METHODS},
    **{m: "binary" for m in ("add", "sub", "mul", "div", "clamp", "clip", "maximum", "minimum", "gt", "lt", "ge",
                             "le", "eq", "ne", "masked_fill")}, "pow": "power", "max": "extremum", "min": "extremum",
    "expand": "expand",
    "matmul": "matmul", "bmm": "matmul", "mean": "reduce", "sum": "reduce", "softmax": "softmax",
    "amax": "reduce", "amin": "reduce", "logsumexp": "reduce", "cumsum": "reduce",
    "log_softmax": "softmax", "transpose": "transpose", "permute": "permute", "flatten": "flatten",
    "view": "view", "reshape": "view", "unflatten": "unflatten", "unsqueeze": "unsqueeze", "squeeze": "squeeze",
    "chunk": "split", "split": "split", "size": "size", "dim": "size", "triu": "triangle", "tril": "triangle",
    "unfold": "unfold", **{m: "create_like" for m in ("new_zeros", "new_ones", "new_full", "new_empty")},
}
# Steps whose result for a slot does not depend on how many slots run (see FastPlan.gather_exact): pure
# data movement, + - * /, comparisons and clamp/maximum/minimum/where (correctly rounded, or not rounding, in
# vector and scalar code alike; pow is not counted), the
# activations ("module", "function": counted so since the direct path began), Linear's batched GEMM (one
# GEMM per slot) and embedding lookups (a copy; the gradient adds each slot's rows in index order,
# whatever the number of slots). Reductions, softmax, normalizations and attention may block their
# loops differently for another number of rows.
GATHER_EXACT_KINDS = {"linear", "module", "function", "binary", "param", "embedding", "getitem", "getattr", "expand",
                      "size", "view", "flatten", "unflatten", "transpose", "permute", "unsqueeze", "squeeze",
                      "cat", "split", "flatten_linear", "create", "create_like", "triangle", "unfold", "glu"}  # flatten_linear: its permuted form only after a conv


@dataclass(frozen=True)
class _Ref:
    """A value of the traced forward, as a step's argument."""

    name: str


@dataclass(frozen=True)
class _Step:
    kind: str  # see FUNCTION_KINDS, METHOD_KINDS and _module_kind
    op: str  # the graph node's op: "call_module", "call_function", "call_method" or "get_attr"
    target: Any  # the module's name (call_module), the function, or the method's name
    args: tuple  # the call's arguments, earlier values as _Ref
    kwargs: tuple[tuple[str, Any], ...]
    dst: str
    folded: tuple[tuple[str, str], ...] = ()  # (module, kind) of steps merged into this one, for kinds()
    in_place: bool = False  # a ReLU that may overwrite its input (see _relu_in_place)

    @property
    def flat(self) -> bool:
        """Whether every argument is a value or a constant (no lists or tuples to look into)."""
        return not any(isinstance(a, (tuple, list, dict, slice)) for a in (*self.args, *(v for _, v in self.kwargs)))


@dataclass(frozen=True)
class _Input:
    name: str  # the value's name in the graph
    arg: str  # the forward's parameter name
    default: Any  # _REQUIRED when it has none
    used: bool


_REQUIRED = object()


@dataclass(frozen=True)
class FastPlan:
    """The traced forward: steps over named values, from the inputs to the output."""

    steps: tuple[_Step, ...]
    inputs: tuple[_Input, ...]
    output: Any  # the name of the value forward returns, or a tuple, list or dict of _Refs (several values)
    aliases: tuple[tuple[str, str], ...] = ()  # (name, stacked name) of parameters shared by two modules
    # plans traced with some inputs fixed to None (see variant) and the compiled steps; filled when needed
    cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def gather_exact(self) -> bool:
        """Whether a run over any two or more slots rounds each slot as the whole stack does (see module doc)."""
        return all(s.kind in GATHER_EXACT_KINDS for s in self.steps)

    def variant(self, template: nn.Module, none: frozenset[str]) -> FastPlan | None:
        """This plan for calls that pass no tensor (None, or nothing) for the inputs ``none``.

        The trace passed a tensor for every input, so branches such as ``if
        mask is not None`` took the tensor's side; a call without it is traced
        again with those inputs fixed to None (once, then cached; the template
        must be in the mode this plan was made for).
        """
        if none not in self.cache:
            self.cache[none] = plan(template, none)
        return self.cache[none]

    @property
    def compiled(self) -> list[tuple[_Step, Callable[..., Any], bool]]:
        """Each step with its kernel (a ``_Runner`` method) and whether its arguments are flat; made once."""
        if "compiled" not in self.cache:
            self.cache["compiled"] = [(s, getattr(_Runner, f"_k_{s.kind}"), s.flat) for s in self.steps]
        return self.cache["compiled"]

    def kinds(self) -> dict[str, str]:
        """The step kind of every module the forward calls, by module name (what ``check_model`` reports)."""
        kinds = {name: kind for s in self.steps for name, kind in s.folded}
        kinds.update({s.target: "linear" if s.kind == "flatten_linear" else s.kind
                      for s in self.steps if s.op == "call_module"})
        return kinds


class _Tracer(fx.Tracer):
    """``fx.Tracer`` that keeps the stack's own module substitutes (:class:`StackedEmbedding`,
    :class:`StackedLayerNorm`, :class:`UnrolledRNN`) whole, and records the size-taking factories
    (:data:`SIZED_FACTORIES`) called with traced sizes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, (StackedEmbedding, StackedLayerNorm, UnrolledRNN, UnrolledRNNCell))
                or super().is_leaf_module(m, qualname))

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        with _FACTORY_LOCK:  # one trace at a time patches torch's namespace, and puts back what was there
            before = {name: getattr(torch, name) for name in SIZED_FACTORIES}
            try:
                for name, fn in before.items():
                    setattr(torch, name, self._recording(fn))
                return super().trace(root, concrete_args)
            finally:
                for name, fn in before.items():
                    setattr(torch, name, fn)

    def _recording(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` as a node of the graph where a size is traced: fx cannot trace ``torch.zeros(x.size(0), 8)``
        itself, since torch's argument parser rejects a Proxy among the sizes before fx sees the call. Calls
        without traced arguments (other threads' too) run ``fn`` as they are."""
        def call(*args: Any, **kwargs: Any) -> Any:
            found: list[bool] = []
            map_aggregate((args, kwargs), lambda a: found.append(True) if isinstance(a, fx.Proxy) else None)
            return self.create_proxy("call_function", fn, args, kwargs) if found else fn(*args, **kwargs)

        return call


# torch factories that take sizes as separate arguments (torch.zeros(batch, hidden)), recorded by _Tracer
SIZED_FACTORIES = ("zeros", "ones", "empty", "full", "randn", "rand")
_FACTORY_LOCK = threading.Lock()


def _settings(module: nn.Module) -> list[tuple[str, dict]]:
    """Every submodule's public plain attributes: tracing must not change any of them."""
    return [(name, {k: v for k, v in vars(m).items() if not k.startswith("_") and not isinstance(v, torch.Tensor)})
            for name, m in module.named_modules()]


# What fx's commonest refusals mean in a model's code, and what keeps the direct path (the model runs on vmap,
# all slots fused, without the direct path's kernels)
_TRACE_HINTS = (
    ("cannot be interpreted as an integer",
     ": a Python loop or size computed from a tensor's shape (range(x.size(1))); the tracer needs a fixed "
     "length there (range(self.steps))"),
    ("cannot be used as inputs to control flow",
     ": an `if`, `while` or `assert` on a tensor's value or size in forward; torch.where, or a branch chosen "
     "in __init__, keeps the direct path"),
)


def _trace(template: nn.Module, none: frozenset[str]) -> fx.Graph | str:
    """The forward's graph (inputs ``none`` fixed to None), traced on a copy; or why it cannot be: the trace
    failed, or tracing changed the module."""
    probe = copy.deepcopy(template)
    before = _settings(probe)
    try:
        graph = _Tracer().trace(probe, concrete_args={name: None for name in none} or None)
    except Exception as exc:  # noqa: BLE001 - control flow, custom tracing problems: not for the direct path
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        hint = next((h for key, h in _TRACE_HINTS if key in first), "")
        return f"its forward cannot be traced with torch.fx ({type(exc).__name__}: {first}){hint}"
    try:
        if _settings(probe) != before:
            return "tracing its forward changed the module (a counter or cache that a traced graph would drop)"
    except Exception:  # noqa: BLE001 - attributes that cannot be compared (e.g. arrays): be safe
        return "tracing its forward may have changed the module (attributes that cannot be compared)"
    return graph


def _node_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        mod = modules[node.target]  # the stack's stand-in for a cell (UnrolledRNNCell) by the user's class name
        return f"module '{node.target}' ({getattr(mod, 'replaces', type(mod).__name__)})"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "get_attr":
        if str(node.target).startswith("_tensor_constant"):  # torch.fx's name for a tensor from outside the model
            return "a tensor the forward reads from outside the model (a global, or a closure's)"
        return f"attribute '{node.target}'"
    fn = node.target
    return f"function {getattr(fn, '__module__', '') or ''}.{getattr(fn, '__name__', fn)}".replace("torch._C._nn.", "F.")


def plan(template: nn.Module, none: frozenset[str] = frozenset()) -> FastPlan | None:
    """A direct plan for ``template``'s forward in its current train/eval mode, or None.

    None when the forward calls a module, function or method the direct path
    does not know (or one it knows with settings it does not cover), or when
    tracing it changed the module (a counter, a cache: Python side effects
    that a traced graph would silently drop). The trace runs on a copy, so the
    template itself is never touched. Python branches on the mode
    (``if self.training``) are fixed by the trace, so callers keep one plan
    per mode. ``none``: inputs fixed to None (see :meth:`FastPlan.variant`).
    :func:`why_not` says why a model has no plan.
    """
    got = _plan_or_reason(template, none)
    return got if isinstance(got, FastPlan) else None


def why_not(template: nn.Module, none: frozenset[str] = frozenset()) -> str | None:
    """Why ``template`` has no direct plan in its current mode (the first thing in the way), or None if it has
    one: e.g. "module 'act' (Softmin) has no direct kernel, or not with these settings"."""
    got = _plan_or_reason(template, none)
    return None if isinstance(got, FastPlan) else got


def _hooked(template: nn.Module) -> str | None:
    """Why hooks keep ``template`` off the direct path, or None: a traced graph calls no module's hooks.

    A forward hook may change what a module returns (``nn.utils.weight_norm``
    and ``prune`` compute ``weight`` in one), so a plan that skipped them would
    compute other numbers than the model. vmap's path calls each module as
    torch does, hooks included.
    """
    import torch.nn.modules.module as torch_module

    if any(getattr(torch_module, "_global" + kind) for kind in MODULE_HOOKS):
        return "a global module hook is registered (torch.nn.modules.module.register_module_*_hook)"
    for name, m in template.named_modules():
        for kind in MODULE_HOOKS:
            if getattr(m, kind, None):
                hook = hook_kind(kind)[:-1]  # "forward hook"
                return f"module '{name}' ({type(m).__name__}) has a {hook} (weight_norm, prune or your own)"
    return None


def _hf_reason(template: nn.Module) -> str | None:
    """Why a stack holding a Hugging Face model runs on vmap, or None: transformers' forwards are beyond fx.

    Checked before the hooks, since :func:`.hf.adapt` registers hooks of its
    own on such a model (turning caches off), and a message about those would
    send the user after the wrong cause.
    """
    for name, m in template.named_modules():
        if hf.is_hf_model(m):
            return (f"module '{name}' ({type(m).__name__}) is a Hugging Face transformers model: torch.fx cannot "
                    "trace transformers' forwards, so the stack runs it on torch.vmap (its attention batched)")
    return None


def _bare_layer_reason(template: nn.Module) -> str | None:
    """Why a stack whose whole model is one recurrent, attention or Transformer layer runs on vmap, or None.

    The direct path computes such a layer where a model holds it (a module kind, see :func:`_module_kind`),
    but fx traces the root's own forward, which branches on its inputs: the trace's failure would blame an
    ``if`` the user never wrote.
    """
    if _module_kind(template) not in _MULTI_INPUT_KINDS:
        return None
    mode = getattr(template, "mode", "") if isinstance(template, UnrolledRNN) else ""
    name = {"LSTM": "LSTM", "GRU": "GRU"}.get(mode, "RNN") if mode else type(template).__name__
    return (f"the whole model is one nn.{name}: the direct path computes such a layer inside a model that holds it "
            "(a module of yours calling it, with its head), not as the model itself")


def _plan_or_reason(template: nn.Module, none: frozenset[str]) -> FastPlan | str:
    hooked = _hf_reason(template) or _hooked(template)
    if hooked:
        return hooked
    modules = dict(template.named_modules())
    for name, _ in template.named_buffers():
        mod_name = name.rpartition(".")[0]
        owner = modules[mod_name]
        if isinstance(owner, NORM_MODULES) and not _norm_ok(owner):
            return f"module '{mod_name}' ({type(owner).__name__}) keeps a cumulative average (momentum=None)"
        if not isinstance(owner, NORM_MODULES):  # only BatchNorm's running statistics
            return (f"buffer '{name}' of module '{mod_name}' ({type(owner).__name__}): the direct path keeps no "
                    "buffers but BatchNorm's running statistics")
    graph = _trace(template, none)
    if isinstance(graph, str):
        return _bare_layer_reason(template) or graph
    params = {n for n, _ in template.named_parameters()}
    arg_names = _input_names(template)
    steps, inputs, output = [], [], None
    for node in graph.nodes:
        if node.op == "placeholder":
            default = node.args[0] if node.args else _REQUIRED
            arg = arg_names[len(inputs)] if len(inputs) < len(arg_names) else node.target
            inputs.append(_Input(node.name, arg, default, arg not in none and bool(node.users)))
            continue
        if node.op == "call_function" and node.target is _ASSERT_IS_NONE:  # holds: the variant is for None
            continue
        if node.op == "output":
            output = _output(node.args[0])
            if output is None:
                return "its forward returns something other than tensors (a tensor, or a tuple, list or dict of them)"
            continue
        step = _step(node, modules, params)
        if step is None:
            return f"{_node_name(node, modules)} has no direct kernel, or not with these settings"
        steps.append(step)
    if not inputs or output is None:
        return "its forward takes no input or returns none"
    if not any(s.kind in _PARAM_KINDS for s in steps):
        return "no layer with parameters runs on the direct path"
    steps = _flatten_into_linear(_relu_in_place(_pool_before_relu(steps, output, modules), output, modules),
                                 output, modules)
    return FastPlan(tuple(steps), tuple(inputs), output, _aliases(template))


def _output(value: Any) -> str | tuple | list | dict | None:
    """What forward returns: a value's name, or a tuple, list or dict (nested too) of values as ``_Ref``s
    (a VAE's ``(reconstruction, mu, log_var)``, a model's ``{"logits": ..., "aux": ...}``); None if anything
    else is in it (a constant, a size)."""
    if isinstance(value, fx.Node):
        return value.name
    leaves: list[Any] = []
    tree = _map_tree(value, lambda a: leaves.append(a) or (_Ref(a.name) if isinstance(a, fx.Node) else a))
    return tree if leaves and all(isinstance(a, fx.Node) for a in leaves) else None


def _map_tree(value: Any, fn: Callable[[Any], Any]) -> Any:
    """``fn`` of each leaf of nested tuples (named ones too), lists and dicts, rebuilt as plain Python types
    (fx keeps a traced list or dict as its own immutable types)."""
    if isinstance(value, tuple):
        items = [_map_tree(v, fn) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_map_tree(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tree(v, fn) for k, v in value.items()}
    return fn(value)


def _is_relu(step: _Step, modules: dict[str, nn.Module]) -> bool:
    if step.kind == "module":
        return type(modules[step.target]) is nn.ReLU
    if step.kind == "function" and step.target in (F.relu, torch.relu, "relu"):
        return len(step.args) == 1 and isinstance(step.args[0], _Ref) and all(k == "inplace" for k, _ in step.kwargs)
    return False


def _pool_before_relu(steps: list[_Step], output: Any, modules: dict[str, nn.Module]) -> list[_Step]:
    """``max_pool(relu(x))`` computed as ``relu(max_pool(x))``: the ReLU then runs on the pooled, 4x smaller tensor.

    Exact, values and gradients alike: ReLU keeps the order of positive values
    and maps the rest to 0, so both forms pick the same maximum; where a
    window holds no positive value both give 0 and a zero gradient (ReLU's
    gradient is 0 for x <= 0 wherever the pooling sends it). Other monotone
    activations are left alone: values they map to one float would tie and
    send a window's gradient to another element. Only where nothing else
    reads the ReLU's input or output. The common conv-(BN)-ReLU-MaxPool of a
    CNN spends a fifth of a fused step in the ReLU and its backward at a
    layer's full resolution (a 28x28 CNN at 32 slots, measured).
    """
    uses = _uses(steps, output)
    out = list(steps)
    for i, relu in enumerate(out[:-1]):
        pool = out[i + 1]
        max_pool = ((pool.kind == "pool" and type(modules[pool.target]) in MAX_POOLS and len(pool.args) == 1)
                    or (pool.kind == "pool_function" and POOL_FUNCTIONS[pool.target][1] is not None))
        if not (_is_relu(relu, modules) and max_pool and pool.args[:1] == (_Ref(relu.dst),)
                and not any(isinstance(a, _Ref) for a in (*pool.args[1:], *(v for _, v in pool.kwargs)))
                and uses.get(relu.dst) == 1 and isinstance(relu.args[0], _Ref) and uses.get(relu.args[0].name) == 1):
            continue
        out[i] = replace(pool, args=(relu.args[0], *pool.args[1:]), dst=relu.dst)
        out[i + 1] = replace(relu, args=(_Ref(relu.dst), *relu.args[1:]), dst=pool.dst)
    return out


ADDITIONS = (operator.add, torch.add, "add", operator.sub, torch.sub, "sub")


def _backward_reads_no_output(step: _Step, modules: dict[str, nn.Module]) -> bool:
    """Whether ``step`` makes a new tensor that its own backward never reads: a convolution, BatchNorm or
    max pooling (theirs read their inputs, see :mod:`.channels_last_batch_norm`) or an addition (whose
    backward reads nothing). An in-place op on the output of one whose backward does (``tanh``, ``exp``, a
    ReLU) would make autograd raise; on a view it would write into another value."""
    return (step.kind in ("conv", "norm") or (step.kind == "binary" and step.target in ADDITIONS)
            or (step.kind == "pool" and type(modules[step.target]) in MAX_POOLS)
            or (step.kind == "pool_function" and POOL_FUNCTIONS[step.target][1] is not None))


def _relu_in_place(steps: list[_Step], output: Any, modules: dict[str, nn.Module]) -> list[_Step]:
    """A ReLU overwrites its input where nothing else reads that input: ``relu(bn(conv(x)))`` and a ResNet's
    ``relu(out + shortcut)`` make one activation-sized tensor fewer per layer.

    Exact, values and gradients alike: ReLU's backward reads its output,
    which is the same either way, and the overwritten input is read by no
    other step, is not among forward's outputs, and is not read by its
    producer's backward (:func:`_backward_reads_no_output`). On a fused step's
    large activations a pass over a tensor just written (still in the
    last-level cache) costs less than writing a new one: a channels-last
    ``[64, 256, 16, 16]`` ReLU after a BatchNorm took about 0.3 against 0.6 ms
    (2-core EPYC); a small ResNet's step at 32 slots ran 2-4% faster.
    """
    uses = _uses(steps, output)
    made_by = {s.dst: s for s in steps}
    out = []
    for s in steps:
        src = s.args[0] if s.args else None
        if (_is_relu(s, modules) and isinstance(src, _Ref) and uses.get(src.name) == 1
                and src.name in made_by and _backward_reads_no_output(made_by[src.name], modules)):
            s = replace(s, in_place=True)
        out.append(s)
    return out


def _uses(steps: list[_Step], output: Any) -> dict[str, int]:
    """How many times each value is read (each value forward returns once more)."""
    uses: dict[str, int] = {}
    count = lambda a: uses.__setitem__(a.name, uses.get(a.name, 0) + 1) if isinstance(a, _Ref) else None  # noqa: E731
    _map_tree(_Ref(output) if isinstance(output, str) else output, count)
    for s in steps:
        map_aggregate((s.args, s.kwargs), count)
    return uses


def _flatten_dims(step: _Step, modules: dict[str, nn.Module]) -> tuple[int, int] | None:
    """``(start_dim, end_dim)`` of a flatten step with constant dimensions (``nn.Flatten``, ``torch.flatten``,
    ``x.flatten``), else None."""
    if step.kind != "flatten" or not step.args or not isinstance(step.args[0], _Ref):
        return None
    if step.op == "call_module":
        mod = modules[step.target]
        return (mod.start_dim, mod.end_dim) if len(step.args) == 1 and not step.kwargs else None
    given = dict(step.kwargs)
    start = step.args[1] if len(step.args) > 1 else given.pop("start_dim", 0)
    end = step.args[2] if len(step.args) > 2 else given.pop("end_dim", -1)
    return (start, end) if not given and isinstance(start, int) and isinstance(end, int) else None


def _flatten_into_linear(steps: list[_Step], output: Any, modules: dict[str, nn.Module]) -> list[_Step]:
    """``linear(flatten(x, start, end))`` as one step, ``flatten_linear``: a CNN's head reading its last map.

    A fused CNN's feature maps are channels-last, so each slot's flattened
    features (channel, row, column) are a strided gather of them (8 ms of a
    28x28 CNN's 250 ms step at 32 slots, a 12.8 MB map), where the same values
    in (row, column, channel) order are a copy of runs of a slot's channels
    (1.2 ms). The step takes that order and permutes the weight's columns to
    match (a copy of the small weight); its gradient is permuted back into the
    flat buffer. The sums of the GEMM then run in another order: fp32 rounding,
    like any change of GEMM kernel. Other inputs, and flattens that keep more
    than the batch dimension, run as the two steps did (:meth:`_Runner._k_flatten_linear`).
    Only where nothing else reads the flattened value.
    """
    uses = _uses(steps, output)
    out: list[_Step] = []
    i = 0
    while i < len(steps):
        flat, head = steps[i], steps[i + 1] if i + 1 < len(steps) else None
        dims = _flatten_dims(flat, modules)
        if (head is not None and dims is not None and head.kind == "linear" and head.op == "call_module"
                and head.args == (_Ref(flat.dst),) and not head.kwargs and uses.get(flat.dst) == 1):
            folded = ((flat.target, flat.kind),) if flat.op == "call_module" else ()
            out.append(replace(head, kind="flatten_linear", args=(flat.args[0], *dims), folded=folded))
            i += 2
            continue
        out.append(flat)
        i += 1
    return out


def _aliases(template: nn.Module) -> tuple[tuple[str, str], ...]:
    """Tied parameters (an LM head sharing the embedding's weight): each further name of a parameter, with
    the name the stack holds it under (its first)."""
    first = {id(t): n for n, t in template.named_parameters()}
    return tuple((n, first[id(t)]) for n, t in template.named_parameters(remove_duplicate=False) if first[id(t)] != n)


_ASSERT_IS_NONE = getattr(fx._symbolic_trace, "_assert_is_none", None)


def _input_names(template: nn.Module) -> list[str]:
    """The forward's parameter names in order (fx renames the placeholders of inputs fixed to None)."""
    return [n for n, p in inspect.signature(template.forward).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _step(node: fx.Node, modules: dict[str, nn.Module], params: set[str]) -> _Step | None:
    """The step computing ``node``, or None if the direct path has no kernel for it."""
    args = map_aggregate(node.args, lambda a: _Ref(a.name) if isinstance(a, fx.Node) else a)
    kwargs = map_aggregate(dict(node.kwargs), lambda a: _Ref(a.name) if isinstance(a, fx.Node) else a)
    if node.op == "get_attr":
        return _Step("param", node.op, node.target, (), (), node.name) if node.target in params else None
    if node.op == "call_module":
        mod = modules[node.target]
        kind = _module_kind(mod)
        if kind is None:
            return None
        if kind in _MULTI_INPUT_KINDS:  # every argument by name, as the module's forward takes them
            try:
                bound = inspect.signature(mod.forward).bind(*args, **kwargs)
            except TypeError:
                return None
            return _Step(kind, node.op, node.target, (), tuple(bound.arguments.items()), node.name)
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return None
        return _Step(kind, node.op, node.target, args, (), node.name)
    if node.op == "call_function":
        kind = FUNCTION_KINDS.get(node.target)
    elif node.op == "call_method":
        kind = METHOD_KINDS.get(node.target)
    else:
        kind = None
    if kind is None or not _static_ok(kind, node):
        return None
    return _Step(kind, node.op, node.target, args, tuple(kwargs.items()), node.name)


def _static_ok(kind: str, node: fx.Node) -> bool:
    """What the graph shows already: a softmax without ``dim`` picks one by the rank it sees (deprecated)."""
    if kind == "softmax":
        return len(node.args) > 1 or node.kwargs.get("dim") is not None
    if node.target is torch.where:  # torch.where(cond) alone gives indices (a shape that depends on the data)
        return len(node.args) + len(node.kwargs) == 3
    if node.target in (torch.cumsum, "cumsum", torch.logsumexp, "logsumexp"):  # dim is required
        return len(node.args) > 1 or "dim" in node.kwargs
    if node.target is F.one_hot:  # without num_classes it counts the largest index of all slots' values together
        classes = node.args[1] if len(node.args) > 1 else node.kwargs.get("num_classes", -1)
        return isinstance(classes, int) and classes > 0
    return True


def _norm_ok(mod: nn.Module) -> bool:
    # momentum=None (a cumulative average) would need each slot's own batch count as the factor.
    return mod.momentum is not None


def _elementwise(fn: Any) -> bool:
    """Whether ``fn`` (a function or a module) acts on each element alone."""
    return fn in ELEMENTWISE_FUNCTIONS or type(fn) in ELEMENTWISE_MODULES


def _module_kind(mod: nn.Module) -> str | None:
    if type(mod) is nn.Linear:
        return "linear"
    if type(mod) in CONV_MODULES:
        return "conv" if mod.padding_mode == "zeros" else None
    if type(mod) in NORM_MODULES:
        return "norm" if _norm_ok(mod) else None
    if type(mod) in GROUP_NORM_MODULES:  # an InstanceNorm with running statistics: vmap
        return "group_norm" if not getattr(mod, "track_running_stats", False) else None
    if type(mod) in FEATURE_DROPOUTS:
        return "feature_dropout"
    if type(mod) is nn.PReLU:
        return "prelu"
    if type(mod) in POOL_MODULES:
        return None if getattr(mod, "return_indices", False) else "pool"
    if type(mod) in ELEMENTWISE_MODULES:
        return "module"
    if type(mod) is nn.Flatten:
        return "flatten"
    if type(mod) is nn.Unflatten:
        return "unflatten"
    if type(mod) in (nn.Softmax, nn.LogSoftmax):
        return "softmax" if mod.dim is not None else None
    if type(mod) in LAYER_NORM_MODULES:
        return "layer_norm"
    if type(mod) is nn.RMSNorm:
        return "rms_norm"
    if type(mod) in EMBEDDING_MODULES:
        return "embedding" if kernels.embedding_ok(mod) else None
    if type(mod) is nn.EmbeddingBag:
        return "embedding_bag" if kernels.embedding_ok(mod) else None
    if type(mod) is nn.MultiheadAttention:
        return "attention" if attention.mha_ok(mod) else None
    if type(mod) is nn.TransformerEncoderLayer:
        return "encoder_layer" if direct_transformer.encoder_layer_ok(mod, _elementwise) else None
    if type(mod) is nn.TransformerEncoder:
        return "encoder" if direct_transformer.encoder_ok(mod, _elementwise) else None
    if type(mod) is nn.TransformerDecoderLayer:
        return "decoder_layer" if direct_transformer.decoder_layer_ok(mod, _elementwise) else None
    if type(mod) is nn.TransformerDecoder:
        return "decoder" if direct_transformer.decoder_ok(mod, _elementwise) else None
    if type(mod) is nn.Transformer:
        return "transformer" if direct_transformer.transformer_ok(mod, _elementwise) else None
    if type(mod) in RNN_MODULES:
        return "rnn" if recurrent.rnn_ok(mod) else None
    return None


_TRANSFORMER_KINDS = {"encoder_layer", "encoder", "decoder_layer", "decoder", "transformer"}
_MULTI_INPUT_KINDS = {"embedding_bag", "attention", "rnn", *_TRANSFORMER_KINDS}
_PARAM_KINDS = {"linear", "conv", "norm", "group_norm", "prelu", "layer_norm", "rms_norm", "embedding",
                "embedding_bag", "attention", "rnn", "param", *_TRANSFORMER_KINDS}



# Weight matrices of at least this many elements get their gradient GEMM'd straight into their
# view of the flat [S, P] buffer. That view is strided across slots, so torch runs one GEMM per slot
# into it, ~4 us of overhead each. Smaller ones are GEMM'd into a contiguous result and copied
# (measured on a 2-core EPYC: break-even near 14k elements).
DIRECT_WRITE_MIN = 16384
# From this many slots, on more than one thread, MKL's batched GEMM writes the strided view in one call
# instead (see strided_gemm; the same values to the bit): it spreads the slots over the threads, where
# torch's per-slot GEMMs meet at a barrier after each. `python benchmarks/strided_gemm.py --rounds 5`
# (2-core Xeon, weights 256x256 to 512x512 and 2048x10, batch 16-64): 0.99-2.04x torch's per-slot GEMMs
# (median 1.15x) on 2 threads from 16 slots, 0.88-1.82x at 8; on one thread 0.89-1.10x from 16 slots.
STRIDED_GEMM_MIN_SLOTS = 16


def _softmax_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.softmax(x, dim)`` by :mod:`.short_softmax`, in torch's memory layout: a dropout after it draws
    its mask in memory order, as the model alone draws it."""
    return short_softmax.softmax(x, dim).contiguous()


def _log_softmax_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch.log_softmax(x, dim)`` as :func:`_softmax_rows` takes softmax."""
    return short_softmax.log_softmax(x, dim).contiguous()


_METHODS = {"softmax": F.softmax, "log_softmax": F.log_softmax}  # x.softmax(dim) as F.softmax(x, dim)
# softmax functions a model calls -> the same over short last-dimension rows, 3-7x sooner on a CPU
_SHORT_ROWS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.softmax: _softmax_rows, torch.softmax: _softmax_rows, F.log_softmax: _log_softmax_rows,
    torch.log_softmax: _log_softmax_rows,
}

GEMMS = ("blas", "onednn")


def onednn_available() -> bool:
    """Whether this torch build has the oneDNN fp32 linear kernel that ``gemm="onednn"`` uses."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ w.T + b`` for 2-d ``a`` and ``w`` (transposed views are read as they are, not copied)."""
    return torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")


def _shared_input_weight_grad(go: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Every slot's weight gradient ``go[s].T @ h`` for an input ``h`` ``[B, I]`` shared by the slots, as one
    oneDNN GEMM ``[n*O, B] @ [B, I]``: ``[n, O, I]``."""
    n, batch, out = go.shape
    rows = go.transpose(1, 2).reshape(n * out, batch)  # [n*O, B]: a copy of the output gradient (small)
    return _onednn_linear(rows, h.t()).view(n, out, h.shape[1])


def _by_slot(h: torch.Tensor, n: int) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    """Each slot's ``[B, I]`` input: the slices of ``[n, B, I]``, or the shared ``[B, I]`` n times."""
    return h.unbind(0) if h.dim() == 3 else [h] * n


class GradTarget:
    """A parameter's view of the flat gradient buffer, written by the backward of :class:`_SlotLinear`.

    Keeps ``torch`` semantics for ``param.grad``: after ``zero_grad`` (grad
    None) the first gradient is written, later ones add to it.
    """

    __slots__ = ("param", "view")

    def __init__(self, param: torch.Tensor, view: torch.Tensor):
        self.param, self.view = param, view

    def take(self) -> tuple[torch.Tensor, bool]:
        """The view to write into, and whether to add to what it holds."""
        g = self.param.grad
        if g is self.view:
            return self.view, True
        if g is not None:  # a tensor someone assigned: carry it into the buffer
            self.view.copy_(g)
        self.param.grad = self.view
        return self.view, g is not None


def write_weight_grad(view: torch.Tensor, add: bool, gt: torch.Tensor, hs: torch.Tensor) -> None:
    """Every slot's weight gradient ``gt @ hs`` into its ``[n, O, I]`` view of the flat gradient buffer
    (added to what the view holds when ``add``)."""
    if view.shape[-2] * view.shape[-1] >= DIRECT_WRITE_MIN:  # GEMMs into the strided view
        batched = view.shape[0] >= STRIDED_GEMM_MIN_SLOTS and torch.get_num_threads() > 1
        if not (batched and strided_gemm.bmm_into(view, gt, hs, add)):
            view.baddbmm_(gt, hs) if add else torch.bmm(gt, hs, out=view)  # (one GEMM per slot)
    else:  # one batched GEMM into a contiguous result, then a copy
        view.add_(torch.bmm(gt, hs)) if add else view.copy_(torch.bmm(gt, hs))


def write_bias_grad(view: torch.Tensor, add: bool, go: torch.Tensor) -> None:
    """Every slot's bias gradient (``go`` summed over its rows) into its ``[n, O]`` view of the buffer."""
    view.add_(go.sum(1)) if add else torch.sum(go, dim=1, out=view)


class _SlotLinear(torch.autograd.Function):
    """``out[s] = h[s] @ w[s].T + b[s]`` for every slot; ``h`` is ``[n, B, I]``, or ``[B, I]`` shared.

    Without targets, the gradients of ``w`` and ``b`` are returned to autograd
    as contiguous tensors (which a leaf takes over without a copy). With
    targets they are written into the flat gradient buffer and not returned.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                targets: tuple[GradTarget | None, GradTarget | None], onednn: bool = False) -> torch.Tensor:
        n = w.shape[0]
        if onednn and h.dim() == 2:  # a shared input: one oneDNN GEMM against every slot's weights, bias fused
            n, o, i = w.shape
            out = _onednn_linear(h, w.reshape(n * o, i), None if b is None else b.reshape(n * o))
            out = out.view(h.shape[0], n, o).transpose(0, 1).contiguous()
        elif onednn:  # one oneDNN GEMM per slot, bias fused; torch.stack gathers the slots' outputs
            bs = b.unbind(0) if b is not None else [None] * n
            out = torch.stack([_onednn_linear(hh, ww, bb) for hh, ww, bb in zip(_by_slot(h, n), w.unbind(0), bs)])
        else:
            hs = h if h.dim() == 3 else h.unsqueeze(0).expand(n, *h.shape)
            out = torch.bmm(hs, w.transpose(1, 2))
            if b is not None:  # after the GEMM, not as its C: MKL's batched GEMM with a broadcast C ran 5-14%
                out.add_(b.unsqueeze(1))  # slower at 1,024 rows a slot (2-core Xeon); the same bits for K <= 256
        ctx.save_for_backward(h, w)
        ctx.targets = targets
        ctx.has_bias = b is not None
        ctx.onednn = onednn
        return out

    @staticmethod
    def backward(ctx: Any, go: torch.Tensor) -> tuple[Any, ...]:
        h, w = ctx.saved_tensors
        n = w.shape[0]
        hs = h if h.dim() == 3 else h.unsqueeze(0).expand(n, *h.shape)
        gt = go.transpose(1, 2)
        tw, tb = ctx.targets
        gh = gw = gb = None
        dnn = ctx.onednn and not torch.is_grad_enabled()  # oneDNN's kernel has no derivative: double backward uses bmm
        if ctx.needs_input_grad[0]:
            if dnn:
                gh = torch.stack([_onednn_linear(g, ww.t()) for g, ww in zip(go.unbind(0), w.unbind(0))])
            else:
                gh = torch.bmm(go, w)
            if h.dim() == 2:
                gh = gh.sum(0)
        with torch.no_grad():
            if tw is not None:
                view, add = tw.take()
                if dnn and h.dim() == 2:  # a shared input: every slot's weight gradient in one GEMM
                    r = _shared_input_weight_grad(go, h)
                    view.add_(r) if add else view.copy_(r)
                elif dnn:  # per slot: the result is still in cache when it is copied into the view
                    for g, hh, dst in zip(gt.unbind(0), _by_slot(h, n), view.unbind(0)):
                        r = _onednn_linear(g, hh.t())
                        dst.add_(r) if add else dst.copy_(r)
                else:
                    write_weight_grad(view, add, gt, hs)
            if tb is not None:
                write_bias_grad(*tb.take(), go)
        if tw is None and ctx.needs_input_grad[1]:
            if dnn and h.dim() == 2:
                gw = _shared_input_weight_grad(go, h)
            elif dnn:
                gw = torch.stack([_onednn_linear(g, hh.t()) for g, hh in zip(gt.unbind(0), _by_slot(h, n))])
            else:
                gw = torch.bmm(gt, hs)
        if tb is None and ctx.has_bias and ctx.needs_input_grad[2]:
            gb = go.sum(1)
        return gh, gw, gb, None, None


class _FeatureMapLinear(torch.autograd.Function):
    """:class:`_SlotLinear` on features in (position, channel) order, its weight in (channel, position) order.

    ``rows`` is ``[n, B, P*C]`` (each slot's flattened channels-last map), ``w`` ``[n, O, C*P]`` as the
    model holds it; the columns of a copy of ``w`` are permuted to match, and its gradient is permuted back.
    """

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                targets: tuple[GradTarget | None, GradTarget | None], channels: int) -> torch.Tensor:
        wt = _position_major(w, channels).transpose(1, 2)
        ctx.save_for_backward(rows, w)
        ctx.targets, ctx.has_bias, ctx.channels = targets, b is not None, channels
        return torch.bmm(rows, wt) if b is None else torch.baddbmm(b.unsqueeze(1), rows, wt)

    @staticmethod
    def backward(ctx: Any, go: torch.Tensor) -> tuple[Any, ...]:
        rows, w = ctx.saved_tensors
        n, o, c = w.shape[0], w.shape[1], ctx.channels
        gh = torch.bmm(go, _position_major(w, c)) if ctx.needs_input_grad[0] else None
        tw, tb = ctx.targets
        want_w = tw is not None or ctx.needs_input_grad[1]
        # [n, O, P*C] -> the weight's [n, O, C, P] order (a view; written or copied once)
        gw = torch.bmm(go.transpose(1, 2), rows).view(n, o, -1, c).transpose(2, 3) if want_w else None
        with torch.no_grad():
            if tw is not None:
                view, add = tw.take()
                dst = view.view(n, o, c, -1)
                dst.add_(gw) if add else dst.copy_(gw)
            if tb is not None:
                write_bias_grad(*tb.take(), go)
        gw = gw.reshape(n, o, -1) if tw is None and ctx.needs_input_grad[1] else None
        gb = go.sum(1) if tb is None and ctx.has_bias and ctx.needs_input_grad[2] else None
        return gh, gw, gb, None, None


def _position_major(w: torch.Tensor, channels: int) -> torch.Tensor:
    """A head's ``[n, O, C*P]`` weight with its columns in (position, channel) order: ``[n, O, P*C]`` (a copy)."""
    n, o = w.shape[:2]
    return w.view(n, o, channels, -1).transpose(2, 3).reshape(n, o, -1)


def _to_slot(h: torch.Tensor, layout: str, n: int) -> torch.Tensor:
    """``[n, ...]``: a shared value broadcast (a view), a channel-stacked one as ``[n, B, C, ...]`` (a view)."""
    if layout == SLOT:
        return h
    if layout == SHARED:
        return h.unsqueeze(0).expand(n, *h.shape)
    b, nc = h.shape[0], h.shape[1]
    return h.view(b, n, nc // n, *h.shape[2:]).transpose(0, 1)


def _to_chan(h: torch.Tensor, layout: str, n: int) -> torch.Tensor:
    if layout == CHAN:
        return h
    if layout == SHARED:
        return h.unsqueeze(1).expand(h.shape[0], n, *h.shape[1:]).reshape(h.shape[0], n * h.shape[1], *h.shape[2:])
    return h.transpose(0, 1).reshape(h.shape[1], n * h.shape[2], *h.shape[3:])


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in channels-last memory, with strides that say so even when it has one channel.

    A one-channel tensor (the first convolution of an image model, or its
    ``[S*O, 1, k, k]`` weight) counts as contiguous in both formats, so
    ``contiguous(memory_format=torch.channels_last)`` leaves its NCHW strides,
    and oneDNN then picks NCHW for the whole stack's output. The pooling and
    the next convolution then ran on NCHW and copied back: 2x the forward time
    of a 32-slot 28x28 CNN (measured). With one channel both layouts hold the
    same bytes, so restriding is free: a chain of views moves the channel stride
    to 1 (its backward is a view too, unlike ``as_strided``'s).
    """
    t = t.contiguous(memory_format=torch.channels_last)
    if t.size(1) == 1 and t.stride(1) != 1:
        t = t.unsqueeze(-1).transpose(1, -1).squeeze(-1)
    return t


def _channels_last_grad(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous(memory_format=torch.channels_last)  # itself where it already is


def _keep_channels_last_grad(a: Act) -> None:
    """Have the gradient of a channels-last CHAN activation come back channels-last, where the op that
    reads it would otherwise hand back an NCHW one (a flatten, a global average pool's ``mean``)."""
    if a.layout == CHAN and a.t.requires_grad and a.t.dim() == 4 and a.t.stride(1) == 1 and a.t.size(1) > 1:
        a.t.register_hook(_channels_last_grad)


def _conv(mod: nn.Module, h: torch.Tensor, layout: str, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """All slots' convolution as one call: output in the "chan" layout."""
    n = w.shape[0]
    transposed = isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    groups = mod.groups
    if not (layout == SHARED and groups == 1):  # a shared batch with groups=1 needs no grouping: S*O outputs
        h, groups = _to_chan(h, layout, n), groups * n
    if transposed and groups == 1:
        # A transposed convolution's weight is [C_in, O/groups, k...]: the slots' outputs of one shared
        # input side by side are [C_in, S*O, k...], slot-major along the output channels.
        weight = w.transpose(0, 1).reshape(w.shape[1], n * w.shape[2], *w.shape[3:])
    else:  # [S*O, C/groups, k...] (or, transposed, [S*C_in, O/groups, k...]): slot s is group block s
        weight = w.reshape(n * w.shape[1], *w.shape[2:])
    if h.dim() == 4:
        # Channels-last: oneDNN's grouped convolution and the pooling after it run 2-20x faster
        # on it (measured on a 2-core EPYC: grouped conv fwd+bwd 6.4 vs 14.9 ms, max-pool 0.08 vs
        # 1.8 ms at 32 slots of a 4-8 channel layer); BatchNorm and ReLU keep the format.
        h, weight = _channels_last(h), _channels_last(weight)
    bias = None if b is None else b.reshape(-1)

    def call() -> torch.Tensor:
        fn = _CONV_FNS[type(mod)]
        if (transposed and bias is not None and h.dim() == 4 and h.device.type == "cpu"
                and not torch.is_autocast_enabled("cpu")):  # under autocast the add would promote the output
            # oneDNN's channels-last transposed convolution is 1.4-2.2x slower forward and backward with its
            # bias than without it, plus a broadcast add (2-core Xeon, 7 shapes at 8-32 slots; the regular
            # convolutions' are not). The sum is the same: the convolution's fp32 result plus the bias.
            out = fn(h, weight, None, mod.stride, mod.padding, mod.output_padding, groups, mod.dilation)
            return out + bias.view(1, -1, 1, 1)
        if transposed:
            return fn(h, weight, bias, mod.stride, mod.padding, mod.output_padding, groups, mod.dilation)
        if strided_pointwise_conv.applies(h, weight, mod.stride, mod.padding, transposed):  # a ResNet's shortcut
            return strided_pointwise_conv.conv(h, weight, bias, mod.stride, groups)
        if padded_channel_conv.applies(h, weight, groups, mod.padding, transposed):  # each slot's RGB images
            return padded_channel_conv.conv(h, weight, bias, mod.stride, mod.padding, mod.dilation, groups)
        if shared_input_conv.applies(h, weight, groups, mod.padding, transposed, mod.stride):  # one batch, all slots
            return shared_input_conv.conv(h, weight, bias, mod.stride, mod.padding, mod.dilation)
        return fn(h, weight, bias, mod.stride, mod.padding, mod.dilation, groups)

    # cuDNN runs the grouped convolution in TF32 where it runs each model's own in fp32 (see conv_precision)
    return conv_precision.full_precision(call) if conv_precision.needs_full_precision(h) else call()


def _norm(mod: nn.Module, name: str, h: torch.Tensor, params: Mapping[str, torch.Tensor],
          buffers: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """BatchNorm of every slot as one ``F.batch_norm`` over the S*C channels ("chan" layout in and out).

    Each slot's channels are normalized with their own batch statistics (or
    running statistics in eval mode), and the running statistics are updated
    in place through views of the stacked ``[n, C]`` buffers, as each module
    would update its own.
    """
    w, b = params.get(f"{name}.weight"), params.get(f"{name}.bias")
    rm, rv = buffers.get(f"{name}.running_mean"), buffers.get(f"{name}.running_var")
    tracked = buffers.get(f"{name}.num_batches_tracked")
    for t in (rm, rv):
        if t is not None and not t.is_contiguous():
            raise Unsupported("running statistics that are not contiguous")
    use_batch = mod.training or rm is None
    w, b = None if w is None else w.reshape(-1), None if b is None else b.reshape(-1)
    rm, rv = None if rm is None else rm.view(-1), None if rv is None else rv.view(-1)
    pieces = channels_last_batch_norm.applies(h, use_batch)
    if pieces:  # (one piece: torch's own kernel sums as accurately)
        out = channels_last_batch_norm.batch_norm(h, w, b, rm, rv, mod.momentum, mod.eps, pieces)
    else:
        out = F.batch_norm(h, rm, rv, w, b, use_batch, mod.momentum, mod.eps)
    if mod.training and tracked is not None:
        with torch.no_grad():
            tracked.add_(1)
    return out


def _dim(d: Any, rank: int) -> int:
    """Dimension ``d`` of a value of ``rank`` dims, made non-negative."""
    if not isinstance(d, int) or not -rank <= d < rank:
        raise Unsupported(f"dimension {d!r} of a {rank}-d value")
    return d % rank


def _arg(args: tuple, kwargs: dict, pos: int, name: str, default: Any = None) -> Any:
    """Argument ``name`` of a call, given at position ``pos`` or by keyword (which is then taken out)."""
    return args[pos] if len(args) > pos else kwargs.pop(name, default)


def _acts(tree: Any) -> list[Act]:
    found: list[Act] = []
    map_aggregate(tree, lambda v: found.append(v) if isinstance(v, Act) else None)
    return found


def _method(name: str) -> Callable[..., Any]:
    """``x.name(*args)`` as a function of ``x``."""
    return lambda x, *args, **kwargs: getattr(x, name)(*args, **kwargs)


class _Runner:
    """One direct forward: the kernel of every step kind, over the stacked parameters.

    Each ``_k_<kind>`` method computes a step from its resolved arguments
    (earlier values as :class:`Act`, Python values as they are) and returns
    its value: an :class:`Act`, a tuple of them (``chunk``, attention), or a
    Python value (``x.shape`` and arithmetic on it, which is per sample and so
    the same for every slot). :mod:`.direct_attention` calls :meth:`project`,
    :meth:`linear` and :meth:`layer_norm` for the layers inside attention blocks.
    """

    def __init__(self, template: nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                 grads: Mapping[str, GradTarget], gemm: str, autocast: bool, random: Any = None):
        self.template, self.params, self.buffers, self.grads = template, params, buffers, grads
        self.gemm, self.autocast = gemm, autocast
        self.random = random  # the rows' own generators (slot_random.Draws); None: torch's global one
        self.n = next(iter(params.values())).shape[0]

    # ------------------------------------------------------------------ layouts
    def slot(self, a: Act) -> torch.Tensor:
        # Leaving a channels-last stack (a flatten before the head): the gradient that comes back is
        # NCHW, and the pooling's and the convolution's backward would each copy the layer's whole
        # input to match it (43 ms of a 270 ms step at 32 slots of a 28x28 CNN, measured). Turning
        # the small gradient at this point channels-last instead costs one copy of it.
        _keep_channels_last_grad(a)
        return _to_slot(a.t, a.layout, self.n)

    def dropout(self, h: Act, p: float, training: bool = True) -> Act:
        """``F.dropout(h, p, training)`` of every slot, each slot's mask from its own generator.

        A shared value becomes per slot (one mask each); a channel-stacked one
        keeps its layout, its masks drawn in each slot's own ``[B, C, ...]``
        order. Without per-slot generators (a direct run outside a ModelBatch)
        the masks come from torch's global generator.
        """
        if not training:
            return h
        p = self.rate(p)
        if p == 0.0:
            return h
        if h.layout == SHARED:
            h = Act(self.slot(h), SLOT)  # one mask per slot, not one for all
        if self.random is None:
            return Act(F.dropout(h.t, p, True), h.layout)
        if p == 1.0:  # F.dropout draws nothing
            return Act(h.t * torch.zeros((), dtype=h.t.dtype, device=h.t.device), h.layout)
        noise = self.random.noise(_to_slot(h.t, h.layout, self.n), p, contiguous=h.layout == CHAN)
        return Act(h.t * (_to_chan(noise, SLOT, self.n) if h.layout == CHAN else noise), h.layout)

    def feature_dropout(self, h: Act, p: float, training: bool, rank: int) -> Act:
        """``F.dropout1d/2d/3d(h, p, training)`` of every slot: one mask element per sample and channel.

        Each slot's ``[B, C, 1, ...]`` mask is drawn contiguous from its own
        generator, as ``F.dropout2d`` draws it for the model alone; a
        channel-stacked value keeps its layout (the masks side by side as
        ``[B, S*C, 1, ...]``).
        """
        shape = h.sample_shape(self.n)
        if len(shape) != rank:  # torch's own rules for other ranks (an unbatched input, a 3-d dropout2d)
            raise Unsupported("channel dropout of an input of another rank")
        if not training:
            return h
        p = self.rate(p)
        if p == 0.0:
            return h
        if h.layout == SHARED:
            h = Act(self.slot(h), SLOT)  # one mask per slot, not one for all
        if p == 1.0:  # F.dropout2d draws nothing
            return Act(h.t * torch.zeros((), dtype=h.t.dtype, device=h.t.device), h.layout)
        noise_shape = (*shape[:2], *[1] * (rank - 2))
        if self.random is None:
            keep = 1.0 - p
            noise = torch.empty((self.n, *noise_shape), dtype=h.t.dtype, device=h.t.device)
            noise = noise.bernoulli_(keep).div_(keep)
        else:
            noise = self.random.noise_of_shape(noise_shape, p, h.t.dtype)
        return Act(h.t * (_to_chan(noise, SLOT, self.n) if h.layout == CHAN else noise), h.layout)

    def rate(self, p: Any) -> float | list[float]:
        """A dropout rate as this forward's rows take it: one float, or each row's (a stack whose slots have
        different rates: see slot_dropout)."""
        return per_row(p, lambda: self.random.rows) if self.random is not None else float(p)

    def per_slot_random(self, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
        """``fn`` on each slot's slice of the slot-first ``tensors`` with the global generator at that slot's
        state, stacked: random ops that take no generator (SDPA's dropout) draw what each model's own call
        draws. Without per-slot generators: one call on all of them."""
        if self.random is None:
            return fn(*tensors)
        return torch.stack(self.random.each(fn, *tensors))

    def broadcast(self, acts: list[Act], chan_ok: bool = True) -> tuple[list[torch.Tensor], str]:
        """Operands of an elementwise op (or ``matmul``) lined up so that each slot's broadcast as alone.

        All shared: as they are. Channel-stacked and shared values of one
        per-sample shape (a residual in a CNN), for elementwise ops: channel-
        stacked. Otherwise slot first, each slot's values padded with size-1
        dims after the slot dimension to one rank (shared values, without the
        slot dimension, line up from the right as they are).
        """
        layouts = {a.layout for a in acts}
        if layouts == {SHARED}:
            return [a.t for a in acts], SHARED
        if (chan_ok and CHAN in layouts and layouts <= {CHAN, SHARED}
                and len({a.sample_shape(self.n) for a in acts}) == 1):
            return [_to_chan(a.t, a.layout, self.n) for a in acts], CHAN
        rank = max(len(a.sample_shape(self.n)) for a in acts)
        return [a.t if a.layout == SHARED else kernels.per_slot_view(self.slot(a), rank) for a in acts], SLOT

    def fn(self, step: _Step) -> Callable[..., Any]:
        """The function a function or method step calls (``x.name(...)`` as ``fn(x, ...)``)."""
        return _method(step.target) if step.op == "call_method" else step.target

    def along(self, fn: Callable[..., Any], x: Act, dims: Any, *args: Any, extra: int = 0, **kwargs: Any) -> Any:
        """``fn(x, dims, *args, **kwargs)`` for every slot in one call: ``dims`` (a dimension of one slot's
        value, or several; of rank + ``extra`` for a new one) counted after the slot dimension."""
        rank = len(x.sample_shape(self.n)) + extra
        many = isinstance(dims, (tuple, list))
        moved = tuple(_dim(d, rank) + (x.layout != SHARED) for d in (dims if many else (dims,)))
        t = self.slot(x) if x.layout == CHAN else x.t
        out = fn(t, moved if many else moved[0], *args, **kwargs)
        layout = SHARED if x.layout == SHARED else SLOT
        if isinstance(out, (tuple, list)):  # a named tuple (torch.max's values and indices) stays one
            acts = [Act(o, layout) for o in out]
            return type(out)(acts) if hasattr(out, "_fields") or type(out).__module__ == "torch.return_types" \
                else tuple(acts)
        return Act(out, layout)

    # --------------------------------------------------------- parameterized layers
    def project(self, h: Act, w: torch.Tensor, b: torch.Tensor | None, wname: str | None = None,
                bname: str | None = None) -> torch.Tensor:
        """``h @ w[s].T + b[s]`` for every slot: ``[n, ..., O]`` from ``h`` of ``[..., I]`` (``nn.Linear``).

        Every leading dimension is a row of one GEMM per slot (a batch of
        sequences is ``[n, B*T, I]``); a shared input is read by every slot's
        GEMM through a stride-0 view, never copied. Gradients of the parameters
        named ``wname``/``bname`` go to their :class:`GradTarget` if they have one.
        """
        n = self.n
        x = self.slot(h) if h.layout == CHAN else h.t
        slotted = h.layout != SHARED
        if x.dim() - slotted < 1 or x.shape[-1] != w.shape[2]:
            raise Unsupported("Linear input without in_features last")  # vmap's path explains errors
        rows = x.dim() == 2 + slotted  # already [n, B, I] / [B, I]: no reshape on the way in or out
        lead = None if rows else x.shape[1:-1] if slotted else x.shape[:-1]
        if not rows:
            x = x.reshape(n, -1, x.shape[-1]) if slotted else x.reshape(-1, x.shape[-1])
        if self.autocast:  # plain ops, which autocast casts (the Function's backward would mix dtypes)
            hs = x if slotted else x.unsqueeze(0).expand(n, *x.shape)
            out = torch.bmm(hs, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), hs, w.transpose(1, 2))
        else:
            targets = (self.grads.get(wname) if wname else None,
                       self.grads.get(bname) if bname and b is not None else None)
            onednn = (self.gemm == "onednn" and w.device.type == "cpu" and w.dtype == torch.float32
                      and x.dtype == torch.float32 and w[0].numel() >= DIRECT_WRITE_MIN)
            out = _SlotLinear.apply(x, w, b, targets, onednn)
        return out if rows else out.view(n, *lead, w.shape[1])

    def linear(self, name: str, h: Act) -> Act:
        """``nn.Linear`` ``name`` of every slot."""
        wname, bname = f"{name}.weight", f"{name}.bias"
        return Act(self.project(h, self.params[wname], self.params.get(bname), wname, bname), SLOT)

    def layer_norm(self, name: str, h: Act) -> Act:
        """``nn.LayerNorm`` ``name`` of every slot (see :func:`.direct_kernels.layer_norm`)."""
        x = self.slot(h) if h.layout == CHAN else h.t
        return kernels.layer_norm(self.template.get_submodule(name), x, h.layout == SHARED,
                                  self.params.get(f"{name}.weight"), self.params.get(f"{name}.bias"))

    def _k_linear(self, step: _Step, h: Act) -> Act:
        return self.linear(step.target, h)

    def _k_flatten_linear(self, step: _Step, h: Act, start: int, end: int) -> Act:
        """``linear(flatten(h, start, end))`` (see :func:`_flatten_into_linear`)."""
        t, name, rank = h.t, step.target, len(h.sample_shape(self.n))
        w, b = self.params[f"{name}.weight"], self.params.get(f"{name}.bias")
        if (h.layout == CHAN and rank == 4 and _dim(start, 4) == 1 and _dim(end, 4) == 3
                and t.device.type == "cpu" and t.size(1) > self.n
                and t.size(1) % self.n == 0 and t.is_contiguous(memory_format=torch.channels_last)
                and not t.is_contiguous() and not self.autocast and self.gemm == "blas"
                and w.shape[2] == t[0].numel() // self.n):
            n, (batch, nc, hh, ww) = self.n, t.shape
            rows = t.permute(0, 2, 3, 1).reshape(batch, hh * ww, n, nc // n).permute(2, 0, 1, 3).reshape(n, batch, -1)
            targets = (self.grads.get(f"{name}.weight"), self.grads.get(f"{name}.bias") if b is not None else None)
            return Act(_FeatureMapLinear.apply(rows, w, b, targets, nc // n), SLOT)
        last = _dim(end, rank) + (h.layout != SHARED)  # as _k_flatten
        return self.linear(name, self.along(lambda x, first: x.flatten(first, last), h, start))

    def _k_layer_norm(self, step: _Step, h: Act) -> Act:
        return self.layer_norm(step.target, h)

    def _k_rms_norm(self, step: _Step, h: Act) -> Act:
        x = self.slot(h) if h.layout == CHAN else h.t
        return kernels.rms_norm(self.template.get_submodule(step.target), x, h.layout == SHARED,
                                self.params.get(f"{step.target}.weight"))

    def _k_conv(self, step: _Step, h: Act) -> Act:
        mod = self.template.get_submodule(step.target)
        rank = _CONV_RANKS[type(mod)]
        if len(h.sample_shape(self.n)) != rank:
            raise Unsupported("convolution input of another rank")
        return Act(_conv(mod, h.t, h.layout, self.params[f"{step.target}.weight"],
                         self.params.get(f"{step.target}.bias")), CHAN)

    def _k_norm(self, step: _Step, h: Act) -> Act:
        mod = self.template.get_submodule(step.target)
        return Act(_norm(mod, step.target, _to_chan(h.t, h.layout, self.n), self.params, self.buffers), CHAN)

    def _k_pool_function(self, step: _Step, h: Any, *args: Any, **kwargs: Any) -> Act:
        """``F.max_pool2d``, the other functional pools, ``F.interpolate`` and the pixel shuffles: per sample
        and channel (block), as the modules."""
        rank, indices_at = POOL_FUNCTIONS[step.target]
        got = len(h.sample_shape(self.n)) if isinstance(h, Act) else 0
        if (got != rank) if rank is not None else (got < 3):
            raise Unsupported("pooling of a constant, or of an input of another rank")
        if indices_at is not None and (kwargs.get("return_indices") or
                                       (len(args) > indices_at and args[indices_at])):
            raise Unsupported("pooling that returns indices")
        fn = step.target
        if h.layout == SLOT:  # fold the slots into the batch
            out = fn(h.t.reshape(self.n * h.t.shape[1], *h.t.shape[2:]), *args, **kwargs)
            return Act(out.view(self.n, h.t.shape[1], *out.shape[1:]), SLOT)
        _keep_channels_last_grad(h)  # as _k_pool
        return Act(fn(h.t, *args, **kwargs), h.layout)

    def _k_group_norm(self, step: _Step, h: Act) -> Act:
        """``nn.GroupNorm`` (G groups) as one ``F.group_norm`` of S*G groups over the S*C stacked channels,
        each slot's groups its own channels; ``nn.InstanceNorm1d/2d/3d`` as one ``F.instance_norm`` over them
        (channels-last 2-d input on a CPU: both as :func:`.channels_last_group_norm.group_norm`)."""
        mod = self.template.get_submodule(step.target)
        shape = h.sample_shape(self.n)
        want = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}.get(type(mod))
        if (want is not None and len(shape) != want) or len(shape) < 2:
            raise Unsupported("normalization of an input of another rank")  # e.g. unbatched: vmap
        x = _to_chan(h.t, h.layout, self.n)
        w, b = self.params.get(f"{step.target}.weight"), self.params.get(f"{step.target}.bias")
        w, b = None if w is None else w.reshape(-1), None if b is None else b.reshape(-1)
        # An instance norm (no running statistics) is a group norm of one channel per group. On channels-last
        # CPU input torch's kernels for both are slow (its instance norm also returns NCHW), so such input goes to
        # channels_last_group_norm: 136 against 49 ms for an instance norm of [64, 512, 28, 28], forward and back.
        groups = self.n * (mod.num_groups if type(mod) is nn.GroupNorm else shape[1])
        if channels_last_group_norm.applies(x, groups):
            return Act(channels_last_group_norm.group_norm(x, groups, w, b, mod.eps), CHAN)
        if type(mod) is nn.GroupNorm:
            return Act(F.group_norm(x, groups, w, b, mod.eps), CHAN)
        return Act(F.instance_norm(x, None, None, w, b, True, mod.momentum if mod.momentum is not None else 0.0,
                                   mod.eps), CHAN)

    def _k_prelu(self, step: _Step, h: Act) -> Act:
        """``nn.PReLU`` of every slot: ``x > 0 ? x : w * x`` (torch's own kernel's formula) with each slot's
        weight, one value or one per channel (dim 1 of the input, as ``F.prelu``)."""
        w = self.params[f"{step.target}.weight"]  # [n, 1] or [n, C]
        shape = h.sample_shape(self.n)
        if w.shape[1] > 1 and (len(shape) < 2 or shape[1] != w.shape[1]):
            raise Unsupported("PReLU weights that do not match the input's channels")
        if h.layout == CHAN:
            chans = shape[1]
            wv = (w.expand(self.n, chans) if w.shape[1] == 1 else w).reshape(1, self.n * chans,
                                                                            *[1] * (len(shape) - 2))
            x = h.t
        else:
            x = self.slot(h) if h.layout == SHARED else h.t
            wv = w.view(self.n, *([1] * len(shape))) if w.shape[1] == 1 else \
                w.view(self.n, 1, w.shape[1], *[1] * (len(shape) - 2))
        return Act(torch.where(x > 0, x, wv * x), CHAN if h.layout == CHAN else SLOT)

    def _k_feature_dropout(self, step: _Step, h: Any, *args: Any, **kwargs: Any) -> Any:
        if step.op == "call_module":
            mod = self.template.get_submodule(step.target)
            p, training, rank = mod.p, mod.training, FEATURE_DROPOUTS[type(mod)]
        else:  # F.dropout2d(input, p=0.5, training=True, inplace=False)
            bound = dict(zip(("p", "training", "inplace"), args), **kwargs)
            p, training, rank = bound.get("p", 0.5), bound.get("training", True), FEATURE_DROPOUTS[step.target]
        if not isinstance(h, Act):
            raise Unsupported("channel dropout of a constant")
        return self.feature_dropout(h, p, training, rank)

    def _k_pool(self, step: _Step, h: Act) -> Act:
        mod = self.template.get_submodule(step.target)
        if h.layout == SLOT:  # fold the slots into the batch: pooling is per sample and channel
            out = mod(h.t.reshape(self.n * h.t.shape[1], *h.t.shape[2:]))
            return Act(out.view(self.n, h.t.shape[1], *out.shape[1:]), SLOT)
        # A pool to one value per channel runs as a mean, whose backward broadcasts the gradient as an
        # NCHW tensor: the ReLU's backward before it then mixes formats (6.0 against 0.8 ms per call
        # at 32 slots of a small ResNet's last block, measured); the hook keeps it channels-last. It is
        # set on every pool's input: where the gradient comes back channels-last (max pooling) it is a no-op.
        _keep_channels_last_grad(h)
        return Act(mod(h.t), h.layout)

    def _k_embedding(self, step: _Step, idx: Act) -> Act:
        if idx.layout == CHAN:
            raise Unsupported("embedding indices computed by a convolution")
        mod = self.template.get_submodule(step.target)
        return Act(kernels.embedding(mod, self.params[f"{step.target}.weight"], idx.t, idx.layout == SLOT), SLOT)

    def _k_embedding_bag(self, step: _Step, input: Act, offsets: Act | None = None,  # noqa: A002 - torch's name
                         per_sample_weights: Act | None = None) -> Act:
        if any(a is not None and (not isinstance(a, Act) or a.layout == CHAN)
               for a in (input, offsets, per_sample_weights)):
            raise Unsupported("EmbeddingBag inputs that are not tensors")
        mod = self.template.get_submodule(step.target)
        out = kernels.embedding_bag(mod, self.params[f"{step.target}.weight"], input.t, input.layout == SLOT,
                                    None if offsets is None else offsets.t,
                                    None if per_sample_weights is None else per_sample_weights.t)
        return Act(out, SLOT)

    def _k_attention(self, step: _Step, query: Act, key: Act, value: Act, **kwargs: Any) -> tuple:
        return attention.multihead_attention(self, step.target, self.template.get_submodule(step.target),
                                             query, key, value, **kwargs)

    def _k_encoder_layer(self, step: _Step, **kwargs: Any) -> Act:
        return direct_transformer.encoder_layer(self, step.target, self.template.get_submodule(step.target), **kwargs)

    def _k_encoder(self, step: _Step, **kwargs: Any) -> Act:
        return direct_transformer.encoder(self, step.target, self.template.get_submodule(step.target), **kwargs)

    def _k_decoder_layer(self, step: _Step, **kwargs: Any) -> Act:
        return direct_transformer.decoder_layer(self, step.target, self.template.get_submodule(step.target), **kwargs)

    def _k_decoder(self, step: _Step, **kwargs: Any) -> Act:
        return direct_transformer.decoder(self, step.target, self.template.get_submodule(step.target), **kwargs)

    def _k_transformer(self, step: _Step, **kwargs: Any) -> Act:
        return direct_transformer.transformer(self, step.target, self.template.get_submodule(step.target), **kwargs)

    def _k_rnn(self, step: _Step, input: Any, hx: Any = None) -> tuple:  # noqa: A002 - torch's name
        return recurrent.rnn(self, step.target, self.template.get_submodule(step.target), input, hx)

    def _k_param(self, step: _Step) -> Act:
        return Act(self.params[step.target], SLOT)

    # ----------------------------------------------------------- elementwise
    def _k_module(self, step: _Step, h: Act) -> Act:
        if step.in_place:  # an nn.ReLU (see _relu_in_place)
            return Act(h.t.relu_(), h.layout)
        mod = self.template.get_submodule(step.target)
        if isinstance(mod, nn.Dropout):
            return self.dropout(h, mod.p, mod.training)
        return Act(mod(h.t), h.layout)

    def _k_function(self, step: _Step, x: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(x, Act):  # e.g. -x.shape[1]
            return self.fn(step)(x, *args, **kwargs)
        if step.in_place:  # F.relu, torch.relu or x.relu() (see _relu_in_place)
            return Act(x.t.relu_(), x.layout)
        if step.target is F.dropout:  # F.dropout(input, p=0.5, training=True, inplace=False)
            bound = dict(zip(("p", "training", "inplace"), args), **kwargs)
            return self.dropout(x, bound.get("p", 0.5), bound.get("training", True))
        return Act(self.fn(step)(x.t, *args, **kwargs), x.layout)

    def _k_binary(self, step: _Step, *args: Any, **kwargs: Any) -> Any:
        acts = _acts((args, kwargs))
        if not acts:  # arithmetic on sizes: the same for every slot
            return self.fn(step)(*args, **kwargs)
        ts, layout = self.broadcast(acts)
        swap = dict(zip(map(id, acts), ts))
        args, kwargs = map_aggregate((args, kwargs), lambda v: swap[id(v)] if isinstance(v, Act) else v)
        return Act(self.fn(step)(*args, **kwargs), layout)

    _k_power = _k_binary  # x ** y: the same broadcasting; not gather-exact (see GATHER_EXACT_KINDS)

    def _k_matmul(self, step: _Step, a: Act, b: Act) -> Act:
        if not (isinstance(a, Act) and isinstance(b, Act)):
            raise Unsupported("matmul with a constant")
        if min(len(a.sample_shape(self.n)), len(b.sample_shape(self.n))) < 2:
            raise Unsupported("matmul of vectors")  # 1-d operands mean a dot or matrix-vector product
        (x, y), layout = self.broadcast([a, b], chan_ok=False)
        return Act(self.fn(step)(x, y) if layout == SHARED else torch.matmul(x, y), layout)

    # ----------------------------------------------------- per-sample dimensions
    def _k_reduce(self, step: _Step, x: Act, *args: Any, **kwargs: Any) -> Act:
        dim = _arg(args, kwargs, 0, "dim")
        if dim is None:  # every dimension of each slot's value
            dim = tuple(range(len(x.sample_shape(self.n))))
        return self.along(self.fn(step), x, dim, *args[1:], **kwargs)

    def _k_extremum(self, step: _Step, x: Any, *args: Any, **kwargs: Any) -> Any:
        """``torch.max``/``min`` (and the methods): of two values elementwise, along a dimension (values and
        indices), or of each slot's whole value."""
        if isinstance(args[0] if args else kwargs.get("other"), Act):
            return self._k_binary(step, x, *args, **kwargs)
        if not isinstance(x, Act):
            raise Unsupported("max/min of a constant")
        if not args and "dim" not in kwargs:  # one value per slot; ties share the gradient, as torch.max's do
            reduce = torch.amax if step.target in (torch.max, "max") else torch.amin
            return self.along(reduce, x, tuple(range(len(x.sample_shape(self.n)))))
        dim = _arg(args, kwargs, 0, "dim")
        return self.along(self.fn(step), x, dim, *args[1:], **kwargs)

    def _k_expand(self, step: _Step, x: Act, *sizes: Any) -> Act:
        """``x.expand(*sizes)`` of each slot's value: new leading dimensions go after the slot dimension."""
        sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes
        if x.layout == SHARED:
            return Act(x.t.expand(*sizes), SHARED)
        t = self.slot(x)
        new = len(sizes) - (t.dim() - 1)
        if new < 0:
            raise Unsupported("expand to fewer dimensions")
        return Act(t.view(t.shape[0], *[1] * new, *t.shape[1:]).expand(self.n, *sizes), SLOT)

    def _k_einsum(self, step: _Step, equation: Any, *operands: Any) -> Act:
        """``torch.einsum`` with the slot dimension as one more index of every per-slot operand and of the
        output (an index letter the equation does not use)."""
        ops = operands[0] if len(operands) == 1 and isinstance(operands[0], (list, tuple)) else operands
        if not isinstance(equation, str) or not ops or not all(isinstance(o, Act) for o in ops):
            raise Unsupported("einsum of constants, or without an equation first")
        if all(o.layout == SHARED for o in ops):
            return Act(torch.einsum(equation, *[o.t for o in ops]), SHARED)
        lhs, arrow, rhs = equation.replace(" ", "").partition("->")
        if not arrow:  # the implicit output orders its letters alphabetically: the slot letter would move
            raise Unsupported("einsum without an explicit output (->)")
        terms = lhs.split(",")
        free = [c for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation]
        if len(terms) != len(ops) or not free:
            raise Unsupported("einsum whose terms do not match its operands")
        s = free[0]
        eq = ",".join(term if o.layout == SHARED else s + term for term, o in zip(terms, ops)) + "->" + s + rhs
        return Act(torch.einsum(eq, *[o.t if o.layout == SHARED else self.slot(o) for o in ops]), SLOT)

    def _k_softmax(self, step: _Step, x: Act, *args: Any, **kwargs: Any) -> Act:
        if step.op == "call_module":  # nn.Softmax / nn.LogSoftmax
            mod = self.template.get_submodule(step.target)
            return self.along(_SHORT_ROWS[F.softmax if isinstance(mod, nn.Softmax) else F.log_softmax], x, mod.dim)
        dim, rest = _arg(args, kwargs, 0, "dim"), args[1:]
        if step.target in (F.softmax, F.log_softmax):  # (input, dim, _stacklevel, dtype)
            kwargs.pop("_stacklevel", None)
            kwargs, rest = ({**kwargs, "dtype": rest[1]} if len(rest) > 1 else kwargs), ()
        if kwargs.get("dtype") is None:  # torch's default (traced F.softmax passes it by keyword)
            kwargs.pop("dtype", None)
        fn = self.fn(step)
        if not rest and not kwargs:  # short rows through the kernel that vectorizes across them: see short_softmax
            fn = _SHORT_ROWS.get(_METHODS.get(step.target) if step.op == "call_method" else step.target, fn)
        return self.along(fn, x, dim, *rest, **kwargs)

    def _k_transpose(self, step: _Step, x: Act, d0: Any, d1: Any) -> Act:
        second = _dim(d1, len(x.sample_shape(self.n))) + (x.layout != SHARED)
        return self.along(lambda t, first: t.transpose(first, second), x, d0)

    def _k_permute(self, step: _Step, x: Act, *dims: Any) -> Act:
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        if len(dims) != len(x.sample_shape(self.n)):
            raise Unsupported("a permute of another rank")
        return self.along(lambda t, order: t.permute(*(range(t.dim() - len(order))), *order), x, dims)

    def _k_unsqueeze(self, step: _Step, x: Act, dim: Any) -> Act:
        return self.along(torch.unsqueeze, x, dim, extra=1)

    def _k_squeeze(self, step: _Step, x: Act, *args: Any, **kwargs: Any) -> Act:
        dim = _arg(args, kwargs, 0, "dim")
        if dim is None:  # every size-1 dimension of each slot's value, never the slot dimension
            dim = tuple(i for i, s in enumerate(x.sample_shape(self.n)) if s == 1)
        return self.along(torch.squeeze, x, dim)

    def _k_flatten(self, step: _Step, x: Act, *args: Any, **kwargs: Any) -> Act:
        if step.op == "call_module":  # nn.Flatten
            mod = self.template.get_submodule(step.target)
            start, end = mod.start_dim, mod.end_dim
        else:
            start, end = _arg(args, kwargs, 0, "start_dim", 0), _arg(args, kwargs, 1, "end_dim", -1)
        last = _dim(end, len(x.sample_shape(self.n))) + (x.layout != SHARED)
        return self.along(lambda t, first: t.flatten(first, last), x, start)

    def _k_unflatten(self, step: _Step, x: Act, *args: Any, **kwargs: Any) -> Act:
        if step.op == "call_module":  # nn.Unflatten
            mod = self.template.get_submodule(step.target)
            dim, sizes = mod.dim, mod.unflattened_size
        else:
            dim, sizes = _arg(args, kwargs, 0, "dim"), _arg(args, kwargs, 1, "sizes")
        return self.along(torch.unflatten, x, dim, sizes)

    def _k_create(self, step: _Step, *args: Any, **kwargs: Any) -> Act:
        """``torch.full(sizes, value)`` and its kind: one tensor every slot shares."""
        if _acts((args, kwargs)):
            raise Unsupported(f"{step.target.__name__} of a value computed in forward")
        return Act(self.fn(step)(*args, **kwargs), SHARED)

    def _k_normalize(self, step: _Step, x: Act, *args: Any, **kwargs: Any) -> Act:
        """``F.normalize(x, p, dim, eps)``: each row divided by its norm, along the slot's own ``dim``."""
        p, dim, eps = (_arg(args, kwargs, i, k, d) for i, (k, d) in enumerate((("p", 2.0), ("dim", 1),
                                                                                ("eps", 1e-12))))
        if _arg(args, kwargs, 3, "out") is not None or _acts((args, kwargs)):
            raise Unsupported("F.normalize into out=, or with a p, dim or eps computed in forward")
        return self.along(lambda t, d: F.normalize(t, p, d, eps), x, dim)

    def _k_random(self, step: _Step, *args: Any, **kwargs: Any) -> Act:
        """``torch.randn_like(x)``, ``rand_like``, and ``randn``/``rand`` of a constant size: each slot's
        value drawn from its own generator, as its model draws it alone (``randn_like`` of a contiguous
        tensor is ``randn`` of its shape); without per-slot generators, one draw for all from torch's."""
        draw = RANDOM_LIKE.get(step.target, step.target)
        if kwargs.pop("generator", None) is not None or "out" in kwargs:
            raise Unsupported("a random draw with a generator or out= of its own")
        if step.target in RANDOM_LIKE:
            x = args[0] if args else kwargs.pop("input")
            if len(args) > 1 or not isinstance(x, Act) or kwargs.pop("memory_format", None) not in (
                    None, torch.preserve_format, torch.contiguous_format):
                raise Unsupported(f"{step.target.__name__} with these arguments")
            shape = tuple(x.sample_shape(self.n))
            kwargs = {"dtype": x.t.dtype, "device": x.t.device, **kwargs}
        else:
            shape = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            if not all(isinstance(d, int) for d in shape):
                raise Unsupported(f"{step.target.__name__} of a size computed in forward")
        if _acts(kwargs) or kwargs.get("requires_grad"):
            raise Unsupported(f"{step.target.__name__} with these arguments")
        if self.random is None:
            return Act(draw((self.n, *shape), **kwargs), SLOT)
        rows = [draw(shape, **kwargs, generator=self.random.generator(j)) for j in range(self.n)]
        return Act(torch.stack(rows), SLOT)

    def _k_create_like(self, step: _Step, x: Act, *args: Any, **kwargs: Any) -> Act:
        """``x.new_zeros(sizes)`` and its kind: a tensor of ``x``'s dtype and device, shared by every slot."""
        if _acts((args, kwargs)):
            raise Unsupported(f".{step.target}() of a value computed in forward")
        return Act(self.fn(step)(x.t, *args, **kwargs), SHARED)

    def _k_unfold(self, step: _Step, x: Act, *args: Any, **kwargs: Any) -> Act:
        """``x.unfold(dim, size, step)``: the windows of each slot's value along its own ``dim`` (a view)."""
        dim, size, stride = (_arg(args, kwargs, i, k) for i, k in enumerate(("dimension", "size", "step")))
        return self.along(lambda t, d: t.unfold(d, size, stride), x, dim)

    def _k_glu(self, step: _Step, x: Act, *args: Any, **kwargs: Any) -> Act:
        """``F.glu(x, dim)``: each slot's value halved along its own ``dim``."""
        return self.along(lambda t, d: F.glu(t, d), x, _arg(args, kwargs, 0, "dim", -1))

    def _k_triangle(self, step: _Step, x: Act, *args: Any, **kwargs: Any) -> Act:
        """``triu``/``tril`` act on the last two dimensions, which a slot's value keeps last in every layout."""
        if len(x.sample_shape(self.n)) < 2 or _acts((args, kwargs)):
            raise Unsupported("triu or tril of a value of one dimension")
        return Act(self.fn(step)(x.t, *args, **kwargs), x.layout)

    def _k_split(self, step: _Step, x: Act, size: Any, *args: Any, **kwargs: Any) -> tuple:
        dim = _arg(args, kwargs, 0, "dim", 0)
        return self.along(lambda t, d: self.fn(step)(t, size, d), x, dim)

    def _k_view(self, step: _Step, x: Act, *sizes: Any) -> Act:
        """``view``/``reshape`` of each slot's value: one reshape of ``[n, ...]`` to ``[n, *sizes]``.

        A reshape only regroups each slot's elements in order, so it is one
        reshape of the stack (a copy where a slot's value is not contiguous, as
        ``reshape`` of it alone would be).
        """
        sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else sizes
        if x.layout == SHARED:
            return Act(x.t.reshape(sizes), SHARED)
        return Act(self.slot(x).reshape(self.n, *sizes), SLOT)

    def _k_cat(self, step: _Step, values: Any, *args: Any, **kwargs: Any) -> Act:
        dim = _arg(args, kwargs, 0, "dim", 0)
        if not all(isinstance(v, Act) for v in values):
            raise Unsupported("cat of constants")
        rank = len(values[0].sample_shape(self.n)) + (step.target is torch.stack)
        d = _dim(dim, rank)
        if all(v.layout == SHARED for v in values):
            return Act(step.target([v.t for v in values], d), SHARED)
        return Act(step.target([self.slot(v) for v in values], d + 1), SLOT)

    # ------------------------------------------------------------- attention
    def _k_sdpa(self, step: _Step, query: Act, key: Act, value: Act, attn_mask: Act | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, **kwargs: Any) -> Act:
        return attention.sdpa(self, query, key, value, attn_mask, dropout_p, is_causal, **kwargs)

    # ---------------------------------------------------------- Python values
    def _k_getitem(self, step: _Step, obj: Any, index: Any) -> Any:
        if not isinstance(obj, Act):
            return obj[index]  # a tuple of values (chunk, attention), a shape
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, (Act, torch.Tensor)) for i in index):
            raise Unsupported("indexing with tensors")
        last = recurrent.last_step(obj, index, self.n)
        if last is not None:  # a recurrent layer's last output, its gradient apart
            return last
        if obj.layout == SHARED:
            return Act(obj.t[index], SHARED)
        return Act(self.slot(obj)[(slice(None), *index)], SLOT)

    def _k_getattr(self, step: _Step, obj: Any, name: str) -> Any:
        if not isinstance(obj, Act):
            return getattr(obj, name)
        if name == "shape":
            return obj.sample_shape(self.n)
        if name == "ndim":
            return len(obj.sample_shape(self.n))
        if name in ("dtype", "device", "is_cuda"):
            return getattr(obj.t, name)
        raise Unsupported(f"tensor attribute {name!r}")

    def _k_size(self, step: _Step, x: Act, *args: Any, **kwargs: Any) -> Any:
        shape = x.sample_shape(self.n)
        if step.target == "dim":
            return len(shape)
        d = _arg(args, kwargs, 0, "dim")
        return shape if d is None else shape[d]


def _call_inputs(p: FastPlan, x: Any, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Each input of the forward (by parameter name) as this call gives it: ``x`` and the extra positional
    and keyword inputs (a dict ``x`` is keyword inputs); the forward's default where it gives none."""
    if isinstance(x, Mapping):
        positional, kwargs = list(args), {**x, **kwargs}
    else:
        positional = [x, *args]
    if len(positional) > len(p.inputs) or set(kwargs) - {i.arg for i in p.inputs}:
        raise Unsupported("inputs the traced forward does not take")
    given = {}
    for i, inp in enumerate(p.inputs):
        given[inp.arg] = positional[i] if i < len(positional) else kwargs.get(inp.arg, inp.default)
        if given[inp.arg] is _REQUIRED:
            raise Unsupported(f"input {inp.arg!r} not given")
    return given


def _bind_inputs(p: FastPlan, given: Mapping[str, Any], per_slot: bool) -> dict[str, Any]:
    """The inputs as values of ``p``'s graph: tensors per slot (``[n, ...]``) with ``per_slot``, else shared."""
    return {inp.name: Act(given[inp.arg], SLOT if per_slot else SHARED) if isinstance(given[inp.arg], torch.Tensor)
            else given[inp.arg] for inp in p.inputs}


def run(p: FastPlan, template: nn.Module, params: Mapping[str, torch.Tensor], x: Any,
        per_slot: bool, grads: Mapping[str, GradTarget] | None = None, gemm: str = "blas",
        buffers: Mapping[str, torch.Tensor] | None = None, args: tuple = (),
        kwargs: Mapping[str, Any] | None = None, random: Any = None) -> torch.Tensor:
    """The forward of every slot in ``params`` (``[n, ...]`` each) on ``x``: returns ``[n, B, ...]``.

    ``x`` is ``[B, ...]`` shared by all slots, or ``[n, B, ...]`` with ``per_slot``
    (a dict ``x`` is the forward's keyword inputs). ``args`` and ``kwargs`` are
    the forward's further inputs (EmbeddingBag ``offsets``, attention masks);
    with ``per_slot`` each tensor among them has the slot dimension too.
    Activation, dropout, pooling and normalization settings are taken from
    ``template`` (its current mode). ``buffers`` are the stacked BatchNorm
    statistics (``[n, C]``, contiguous), updated in place in training mode.
    ``grads`` maps parameter names to the buffer views their gradients are
    written into during backward (see :class:`GradTarget`); those parameters
    then get no gradient through autograd, so use it only for ``.backward()``.
    ``gemm`` picks the CPU fp32 kernels of large layers (see the module docstring).
    ``random`` (a :class:`~ray_modelbatch.slot_random.Draws`) gives each slot's
    dropout its own generator; None draws from torch's global one.
    """
    first = x if isinstance(x, torch.Tensor) else next(iter(x.values()), None) if isinstance(x, Mapping) else None
    if not isinstance(first, torch.Tensor) or (per_slot and first.dim() == 0):
        raise Unsupported("inputs that are not tensors")
    if len(p.inputs) == 1 and not args and not kwargs and isinstance(x, torch.Tensor):  # model(x): the usual call
        given = {p.inputs[0].arg: x}
    else:
        given = _call_inputs(p, x, tuple(args), kwargs or {})
        none = frozenset(i.arg for i in p.inputs if i.used and given[i.arg] is None)
        if none:  # the trace had a tensor there: the plan traced without it
            p = p.variant(template, none)
            if p is None:
                raise Unsupported(f"inputs {sorted(none)} left out, and the forward without them has no plan")
    grads = grads or {}
    if p.aliases:  # a tied parameter under each of its names
        params = {**params, **{a: params[n] for a, n in p.aliases}}
        grads = {**grads, **{a: grads[n] for a, n in p.aliases if n in grads}}
    runner = _Runner(template, params, buffers or {}, grads, gemm, torch.is_autocast_enabled(first.device.type),
                     random)
    values = _bind_inputs(p, given, per_slot)
    resolve = lambda a: values[a.name] if isinstance(a, _Ref) else a  # noqa: E731
    for step, kernel, flat in p.compiled:
        if flat:  # most steps: one dict lookup per argument, no tree walk
            args = [values[a.name] if type(a) is _Ref else a for a in step.args]
            kwargs = {k: values[v.name] if type(v) is _Ref else v for k, v in step.kwargs} if step.kwargs else {}
        else:
            args, kwargs = map_aggregate(step.args, resolve), map_aggregate(dict(step.kwargs), resolve)
        values[step.dst] = kernel(runner, step, *args, **kwargs)
    if not isinstance(p.output, str):  # several values: each with its leading slot dimension, as vmap returns them
        return _map_tree(p.output, lambda a: _returned(runner, values[a.name]))
    return _returned(runner, values[p.output])


def _returned(runner: _Runner, out: Any) -> torch.Tensor:
    if not isinstance(out, Act):
        raise Unsupported("a forward that does not return a tensor")
    return runner.slot(out)
