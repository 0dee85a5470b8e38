"""Direct batched kernels for models built only from ``nn.Linear`` and elementwise activations.

``torch.vmap`` pays a per-op cost that dominates small models (an MLP step
is ~90 batched ops), and it runs a shared-input Linear as a batched matmul
over an expanded input. For the most common sweep models (MLPs) the whole
forward can be written on the stacked parameters directly:

* every Linear is one batched GEMM over the slots, ``[S, B, I] @ [S, I, O]``
  (a batch shared by every slot is broadcast with stride 0, never copied),
  read straight from the strided parameter views of the flat ``[S, P]``
  buffer; its backward is two batched GEMMs;
* activations and dropout are elementwise, so they act per slot as they are
  (dropout draws an independent mask per slot and element).

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


class Unsupported(Exception):
    """This call cannot take the direct path (e.g. inputs that are not ``[B, features]``)."""


@dataclass(frozen=True)
class _Step:
    kind: str  # "linear" | "module" | "function"
    target: Any  # the module's name (linear, module), or the function
    src: str
    dst: str


@dataclass(frozen=True)
class FastPlan:
    """The traced forward: steps over named values, from the input to the output."""

    steps: tuple[_Step, ...]
    input: str
    output: str


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
    if any(True for _ in template.buffers()):
        return None
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
    modules = dict(template.named_modules())
    steps, inputs, output = [], [], None
    for node in graph.nodes:
        if node.op == "placeholder":
            inputs.append(node.name)
        elif node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                return None
            output = node.args[0].name
        elif node.op == "call_module":
            mod = modules[node.target]
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                return None
            if type(mod) is nn.Linear:
                steps.append(_Step("linear", node.target, node.args[0].name, node.name))
            elif type(mod) in ELEMENTWISE_MODULES:
                steps.append(_Step("module", node.target, node.args[0].name, node.name))
            else:
                return None
        elif node.op == "call_function" and node.target in ELEMENTWISE_FUNCTIONS:
            if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                return None
            steps.append(_Step("function", node.target, node.args[0].name, node.name))
        else:
            return None
    if len(inputs) != 1 or output is None or not any(s.kind == "linear" for s in steps):
        return None
    return FastPlan(tuple(steps), inputs[0], output)


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


def run(p: FastPlan, template: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
        per_slot: bool, grads: Mapping[str, GradTarget] | None = None, gemm: str = "blas") -> torch.Tensor:
    """The forward of every slot in ``params`` (``[n, ...]`` each) on ``x``: returns ``[n, B, out]``.

    ``x`` is ``[B, in]`` shared by all slots, or ``[n, B, in]`` with ``per_slot``.
    Activation and dropout modules are taken from ``template`` (its current mode).
    ``grads`` maps parameter names to the buffer views their gradients are
    written into during backward (see :class:`GradTarget`); those parameters
    then get no gradient through autograd, so use it only for ``.backward()``.
    ``gemm`` picks the CPU fp32 kernels of large layers (see the module docstring).
    """
    n = next(iter(params.values())).shape[0]
    if not isinstance(x, torch.Tensor) or x.dim() != (3 if per_slot else 2):
        raise Unsupported("inputs other than [batch, features]")
    grads = grads or {}
    autocast = torch.is_autocast_enabled(x.device.type)
    values: dict[str, tuple[torch.Tensor, bool]] = {p.input: (x, per_slot)}  # name -> (tensor, has slot dim)
    for step in p.steps:
        h, slotted = values[step.src]
        if step.kind == "linear":
            wname, bname = f"{step.target}.weight", f"{step.target}.bias"
            w, b = params[wname], params.get(bname)
            if h.shape[-1] != w.shape[2]:
                raise Unsupported("input features do not match")  # vmap's path explains the error
            if autocast:  # plain ops, which autocast casts (the Function's backward would mix dtypes)
                hs = h if slotted else h.unsqueeze(0).expand(n, *h.shape)
                out = torch.bmm(hs, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), hs, w.transpose(1, 2))
            else:
                targets = (grads.get(wname), grads.get(bname) if b is not None else None)
                onednn = (gemm == "onednn" and w.device.type == "cpu" and w.dtype == torch.float32
                          and h.dtype == torch.float32 and w[0].numel() >= DIRECT_WRITE_MIN)
                out = _SlotLinear.apply(h, w, b, targets, onednn)
            values[step.dst] = (out, True)
        else:
            fn = template.get_submodule(step.target) if step.kind == "module" else step.target
            if isinstance(fn, nn.Dropout) and not slotted and fn.training and fn.p > 0:
                h, slotted = h.unsqueeze(0).expand(n, *h.shape), True  # one mask per slot, not one for all
            values[step.dst] = (fn(h), slotted)
    out, slotted = values[p.output]
    return out if slotted else out.unsqueeze(0).expand(n, *out.shape)
