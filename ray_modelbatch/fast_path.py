"""Direct batched kernels for the common layers, so small models skip ``torch.vmap``.

``torch.vmap`` pays a per-op cost that dominates small models (an MLP step
is ~90 batched ops), and on CPU it runs convolutions about as fast as a loop.
For models built from the layers below, the whole forward is written on the
stacked parameters directly:

* every ``nn.Linear`` is one batched GEMM over the slots, ``[S, B, I] @ [S, I, O]``
  (a batch shared by every slot is broadcast with stride 0, never copied),
  read straight from the strided parameter views of the flat ``[S, P]``
  buffer; its backward is two batched GEMMs;
* every ``nn.Conv1d``/``nn.Conv2d`` is one convolution over all slots: the
  slots' channels side by side (``[B, S*C, H, W]``) and ``groups`` multiplied
  by S, as HFTA fuses them; on a batch shared by every slot the first
  convolution needs no groups at all (``S*O`` output channels of one input);
* ``nn.BatchNorm1d/2d`` is one ``F.batch_norm`` over the ``S*C`` channels,
  whose running statistics are views of the stacked buffers, and pooling acts
  per channel as it is: a CNN stays in the channel-stacked layout from its
  first convolution to its flatten, with no copies between layers;
* activations and dropout are elementwise, so they act per slot as they are
  (dropout draws an independent mask per slot and element);
* ``view``/``reshape`` with a leading ``-1`` and ``flatten(1)`` reshape each sample.

On CPU, ``gemm="onednn"`` runs the large GEMMs (weights of at least
:data:`DIRECT_WRITE_MIN` elements) one slot at a time through oneDNN instead of
the BLAS that ``torch.bmm`` uses. Where the BLAS does not use the CPU's widest
vector units (MKL on AMD CPUs runs its AVX2 code, oneDNN its AVX-512 code) that
is up to 2x faster per GEMM. The results are fp32-accurate but not bitwise
those of ``nn.Linear``, so Adam, which turns rounding in near-zero gradients
into steps of size lr, drifts apart from a solo run sooner; hence opt-in.

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
A plan of Linear and elementwise steps only is also *gather-exact*: running
any two or more of the slots gives each the bits it gets in the whole stack
(:attr:`FastPlan.gather_exact`); convolution and normalization kernels may
pick another algorithm for another number of channels, so plans with them
are not.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn

ELEMENTWISE_MODULES = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Softplus,
                       nn.Identity, nn.Dropout)
ELEMENTWISE_FUNCTIONS = {torch.relu, torch.tanh, torch.sigmoid, F.relu, F.gelu, F.silu, F.tanh, F.sigmoid}
CONV_MODULES = (nn.Conv1d, nn.Conv2d)
NORM_MODULES = (nn.BatchNorm1d, nn.BatchNorm2d)
# Per-channel ops: they act on a [B, S*C, ...] tensor exactly as on each slot's [B, C, ...].
POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
FLATTEN_FUNCTIONS = {torch.flatten}
RESHAPE_METHODS = {"view", "reshape"}
GATHER_EXACT_KINDS = {"linear", "module", "function"}


class Unsupported(Exception):
    """This call cannot take the direct path (e.g. inputs that are not ``[B, features]``)."""


@dataclass(frozen=True)
class _Step:
    kind: str  # "linear" | "conv" | "norm" | "pool" | "module" | "function" | "flatten" | "reshape"
    target: Any  # the module's name (linear, conv, norm, pool, module), the function, the reshape's
    #              sizes, or the flatten's start_dim
    src: str
    dst: str


@dataclass(frozen=True)
class FastPlan:
    """The traced forward: steps over named values, from the input to the output."""

    steps: tuple[_Step, ...]
    input: str
    output: str

    @property
    def gather_exact(self) -> bool:
        """Whether a run over any two or more slots rounds each slot as the whole stack does (see module doc)."""
        return all(s.kind in GATHER_EXACT_KINDS for s in self.steps)


def _settings(module: nn.Module) -> list[tuple[str, dict]]:
    """Every submodule's public plain attributes: tracing must not change any of them."""
    return [(name, {k: v for k, v in vars(m).items() if not k.startswith("_") and not isinstance(v, torch.Tensor)})
            for name, m in module.named_modules()]


def plan(template: nn.Module) -> FastPlan | None:
    """A direct plan for ``template``'s forward in its current train/eval mode, or None.

    None when the forward has anything but Linear layers and elementwise ops,
    or when tracing it changed the module (a counter, a cache: Python side
    effects that a traced graph would silently drop). The trace runs on a copy,
    so the template itself is never touched. Python branches on the mode
    (``if self.training``) are fixed by the trace, so callers keep one plan
    per mode.
    """
    modules = dict(template.named_modules())
    for name, _ in template.named_buffers():
        owner = modules[name.rpartition(".")[0]]
        if not (isinstance(owner, NORM_MODULES) and _norm_ok(owner)):
            return None  # buffers the direct path does not keep (only BatchNorm's running statistics)
    probe = copy.deepcopy(template)
    before = _settings(probe)
    try:
        graph = fx.symbolic_trace(probe).graph
    except Exception:  # noqa: BLE001 - control flow, custom tracing problems: not for the direct path
        return None
    try:
        if _settings(probe) != before:
            return None
    except Exception:  # noqa: BLE001 - attributes that cannot be compared (e.g. arrays): be safe
        return None
    steps, inputs, output = [], [], None
    for node in graph.nodes:
        if node.op == "placeholder":
            inputs.append(node.name)
            continue
        if node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                return None
            output = node.args[0].name
            continue
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        src, rest = node.args[0].name, node.args[1:]
        if node.op == "call_module":
            mod = modules[node.target]
            if rest or node.kwargs:
                return None
            kind = _module_kind(mod)
            if kind is None:
                return None
            steps.append(_Step(kind, mod.start_dim if kind == "flatten" else node.target, src, node.name))
        elif node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS and not rest and not node.kwargs:
            steps.append(_Step("function", node.target, src, node.name))
        elif _is_flatten(node, rest):
            steps.append(_Step("flatten", rest[0] if rest else node.kwargs.get("start_dim", 0), src, node.name))
        elif (node.op == "call_method" and node.target in RESHAPE_METHODS and not node.kwargs and len(rest) > 1
              and rest[0] == -1 and all(isinstance(d, int) and d > 0 for d in rest[1:])):
            steps.append(_Step("reshape", tuple(rest[1:]), src, node.name))
        else:
            return None
    if len(inputs) != 1 or output is None or not any(s.kind in ("linear", "conv") for s in steps):
        return None
    return FastPlan(tuple(steps), inputs[0], output)


def _norm_ok(mod: nn.Module) -> bool:
    # momentum=None (a cumulative average) would need each slot's own batch count as the factor.
    return mod.momentum is not None


def _module_kind(mod: nn.Module) -> str | None:
    if type(mod) is nn.Linear:
        return "linear"
    if type(mod) in CONV_MODULES:
        return "conv" if mod.padding_mode == "zeros" else None
    if type(mod) in NORM_MODULES:
        return "norm" if _norm_ok(mod) else None
    if type(mod) in POOL_MODULES:
        return None if getattr(mod, "return_indices", False) else "pool"
    if type(mod) in ELEMENTWISE_MODULES:
        return "module"
    if type(mod) is nn.Flatten:
        return "flatten" if mod.end_dim == -1 and (mod.start_dim == 1 or mod.start_dim < 0) else None
    return None


def _is_flatten(node: fx.Node, rest: tuple) -> bool:
    """``x.flatten(1)``, ``torch.flatten(x, 1)`` (or a negative start that means 1): every sample to one row."""
    start = rest[0] if rest else node.kwargs.get("start_dim", 0)
    end = rest[1] if len(rest) > 1 else node.kwargs.get("end_dim", -1)
    extra = set(node.kwargs) - {"start_dim", "end_dim"}
    call = (node.op == "call_method" and node.target == "flatten") or (
        node.op == "call_function" and node.target in FLATTEN_FUNCTIONS)
    return call and not extra and len(rest) <= 2 and isinstance(start, int) and (start == 1 or start < 0) and end == -1


# Weight matrices of at least this many elements get their gradient GEMM'd straight into their
# view of the flat [S, P] buffer. That view is strided across slots, which MKL's batched GEMM does
# not take, so torch runs one GEMM per slot: ~4 us of overhead each, against copying the matrix
# from a contiguous batched result (measured on a 2-core EPYC: break-even near 14k elements).
DIRECT_WRITE_MIN = 16384


GEMMS = ("blas", "onednn")


def onednn_available() -> bool:
    """Whether this torch build has the oneDNN fp32 linear kernel that ``gemm="onednn"`` uses."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_linear(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ w.T + b`` for 2-d ``a`` and ``w`` (transposed views are read as they are, not copied)."""
    return torch.ops.mkldnn._linear_pointwise(a, w, b, "none", [], "")


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
        if onednn:  # one oneDNN GEMM per slot, bias fused; torch.stack gathers the slots' outputs
            bs = b.unbind(0) if b is not None else [None] * n
            out = torch.stack([_onednn_linear(hh, ww, bb) for hh, ww, bb in zip(_by_slot(h, n), w.unbind(0), bs)])
        else:
            hs = h if h.dim() == 3 else h.unsqueeze(0).expand(n, *h.shape)
            wt = w.transpose(1, 2)
            out = torch.bmm(hs, wt) if b is None else torch.baddbmm(b.unsqueeze(1), hs, wt)
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
                if dnn:  # per slot: the result is still in cache when it is copied into the view
                    for g, hh, dst in zip(gt.unbind(0), _by_slot(h, n), view.unbind(0)):
                        r = _onednn_linear(g, hh.t())
                        dst.add_(r) if add else dst.copy_(r)
                elif view[0].numel() >= DIRECT_WRITE_MIN:  # GEMMs into the strided view, one slot at a time
                    view.baddbmm_(gt, hs) if add else torch.bmm(gt, hs, out=view)
                else:  # one batched GEMM into a contiguous result, then a copy
                    view.add_(torch.bmm(gt, hs)) if add else view.copy_(torch.bmm(gt, hs))
            if tb is not None:
                view, add = tb.take()
                view.add_(go.sum(1)) if add else torch.sum(go, dim=1, out=view)
        if tw is None and ctx.needs_input_grad[1]:
            if dnn:
                gw = torch.stack([_onednn_linear(g, hh.t()) for g, hh in zip(gt.unbind(0), _by_slot(h, n))])
            else:
                gw = torch.bmm(gt, hs)
        if tb is None and ctx.has_bias and ctx.needs_input_grad[2]:
            gb = go.sum(1)
        return gh, gw, gb, None, None


# A value of the traced forward is in one of three layouts:
#   "shared": [B, ...], the same for every slot (the input batch, before any parameter);
#   "slot":   [n, B, ...], slot first (what Linear layers take and every output is);
#   "chan":   [B, n*C, ...], the slots' channels side by side (what convolutions, BatchNorm and
#             pooling take: one kernel call over all slots, no copies between those layers).
def _to_slot(h: torch.Tensor, layout: str, n: int) -> torch.Tensor:
    if layout == "slot":
        return h
    if layout == "shared":
        return h.unsqueeze(0).expand(n, *h.shape)
    b, nc = h.shape[0], h.shape[1]
    return h.view(b, n, nc // n, *h.shape[2:]).transpose(0, 1)


def _to_chan(h: torch.Tensor, layout: str, n: int) -> torch.Tensor:
    if layout == "chan":
        return h
    if layout == "shared":
        return h.unsqueeze(1).expand(h.shape[0], n, *h.shape[1:]).reshape(h.shape[0], n * h.shape[1], *h.shape[2:])
    return h.transpose(0, 1).reshape(h.shape[1], n * h.shape[2], *h.shape[3:])


def _conv(mod: nn.Module, h: torch.Tensor, layout: str, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """All slots' convolution as one call: output in the "chan" layout."""
    n = w.shape[0]
    fn = F.conv1d if isinstance(mod, nn.Conv1d) else F.conv2d
    groups = mod.groups
    if not (layout == "shared" and groups == 1):  # a shared batch with groups=1 needs no grouping: S*O outputs
        h, groups = _to_chan(h, layout, n), groups * n
    weight = w.reshape(n * w.shape[1], *w.shape[2:])
    if h.dim() == 4:
        # Channels-last: oneDNN's grouped convolution and the pooling after it run 2-20x faster
        # on it (measured on a 2-core EPYC: grouped conv fwd+bwd 6.4 vs 14.9 ms, max-pool 0.08 vs
        # 1.8 ms at 32 slots of a 4-8 channel layer); BatchNorm and ReLU keep the format.
        h, weight = h.contiguous(memory_format=torch.channels_last), weight.contiguous(memory_format=torch.channels_last)
    bias = None if b is None else b.reshape(-1)
    return fn(h, weight, bias, mod.stride, mod.padding, mod.dilation, groups)


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
    out = F.batch_norm(h, None if rm is None else rm.view(-1), None if rv is None else rv.view(-1),
                       None if w is None else w.reshape(-1), None if b is None else b.reshape(-1),
                       use_batch, mod.momentum, mod.eps)
    if mod.training and tracked is not None:
        with torch.no_grad():
            tracked.add_(1)
    return out


def run(p: FastPlan, template: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
        per_slot: bool, grads: Mapping[str, GradTarget] | None = None, gemm: str = "blas",
        buffers: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The forward of every slot in ``params`` (``[n, ...]`` each) on ``x``: returns ``[n, B, ...]``.

    ``x`` is ``[B, ...]`` shared by all slots, or ``[n, B, ...]`` with ``per_slot``.
    Activation, dropout, pooling and normalization settings are taken from
    ``template`` (its current mode). ``buffers`` are the stacked BatchNorm
    statistics (``[n, C]``, contiguous), updated in place in training mode.
    ``grads`` maps parameter names to the buffer views their gradients are
    written into during backward (see :class:`GradTarget`); those parameters
    then get no gradient through autograd, so use it only for ``.backward()``.
    ``gemm`` picks the CPU fp32 kernels of large layers (see the module docstring).
    """
    n = next(iter(params.values())).shape[0]
    if not isinstance(x, torch.Tensor) or x.dim() < (2 if per_slot else 1):
        raise Unsupported("inputs that are not one tensor with a batch dimension")
    grads, buffers = grads or {}, buffers or {}
    autocast = torch.is_autocast_enabled(x.device.type)
    values: dict[str, tuple[torch.Tensor, str]] = {p.input: (x, "slot" if per_slot else "shared")}
    for step in p.steps:
        h, layout = values[step.src]
        if step.kind == "linear":
            h = _to_slot(h, layout, n) if layout == "chan" else h
            slotted = layout != "shared"
            wname, bname = f"{step.target}.weight", f"{step.target}.bias"
            w, b = params[wname], params.get(bname)
            if h.dim() != (3 if slotted else 2) or h.shape[-1] != w.shape[2]:
                raise Unsupported("Linear input that is not [batch, in_features]")  # vmap's path explains errors
            if autocast:  # plain ops, which autocast casts (the Function's backward would mix dtypes)
                hs = h if slotted else h.unsqueeze(0).expand(n, *h.shape)
                out = torch.bmm(hs, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), hs, w.transpose(1, 2))
            else:
                targets = (grads.get(wname), grads.get(bname) if b is not None else None)
                onednn = (gemm == "onednn" and w.device.type == "cpu" and w.dtype == torch.float32
                          and h.dtype == torch.float32 and w[0].numel() >= DIRECT_WRITE_MIN)
                out = _SlotLinear.apply(h, w, b, targets, onednn)
            values[step.dst] = (out, "slot")
        elif step.kind == "conv":
            mod = template.get_submodule(step.target)
            rank = 3 if isinstance(mod, nn.Conv1d) else 4  # with the batch dimension
            if h.dim() - (layout == "slot") != rank:
                raise Unsupported("convolution input of another rank")
            values[step.dst] = (_conv(mod, h, layout, params[f"{step.target}.weight"],
                                      params.get(f"{step.target}.bias")), "chan")
        elif step.kind == "norm":
            mod = template.get_submodule(step.target)
            values[step.dst] = (_norm(mod, step.target, _to_chan(h, layout, n), params, buffers), "chan")
        elif step.kind == "pool":
            mod = template.get_submodule(step.target)
            if layout == "slot":  # fold the slots into the batch: pooling is per sample and channel
                out = mod(h.reshape(n * h.shape[1], *h.shape[2:]))
                values[step.dst] = (out.view(n, h.shape[1], *out.shape[1:]), "slot")
            else:
                values[step.dst] = (mod(h), layout)
        elif step.kind == "flatten":
            rank = h.dim() - (layout == "slot")  # of one sample batch: [B, ...]
            if (step.target if step.target >= 0 else rank + step.target) != 1:
                raise Unsupported("a flatten that does not keep exactly the batch dimension")
            if layout == "shared":
                values[step.dst] = (h.flatten(1), "shared")
            else:
                values[step.dst] = (_to_slot(h, layout, n).flatten(2), "slot")
        elif step.kind == "reshape":
            if layout == "shared":
                values[step.dst] = (h.reshape(-1, *step.target), "shared")
            else:
                values[step.dst] = (_to_slot(h, layout, n).reshape(n, -1, *step.target), "slot")
        else:
            fn = template.get_submodule(step.target) if step.kind == "module" else step.target
            if isinstance(fn, nn.Dropout) and layout == "shared" and fn.training and fn.p > 0:
                h, layout = h.unsqueeze(0).expand(n, *h.shape), "slot"  # one mask per slot, not one for all
            values[step.dst] = (fn(h), layout)
    out, layout = values[p.output]
    return _to_slot(out, layout, n)
