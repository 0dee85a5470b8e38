"""Direct batched kernels for models built only from ``nn.Linear`` and elementwise activations.

``torch.vmap`` pays a per-op cost that dominates small models (an MLP step
is ~90 batched ops), and it runs a shared-input Linear as a batched matmul
over an expanded input. For the most common sweep models (MLPs) the whole
forward can be written on the stacked parameters directly:

* the first Linear on a batch shared by every slot is **one GEMM**,
  ``x [B, I] @ W.view(S*O, I).T``, whose weight gradient autograd computes as
  one GEMM straight into the ``[S, O, I]`` layout;
* every later Linear is one ``baddbmm`` over ``[S, B, I]`` activations;
* activations and dropout are elementwise, so they act per slot as they are
  (dropout draws an independent mask per slot and element).

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


def run(p: FastPlan, template: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor,
        per_slot: bool) -> torch.Tensor:
    """The forward of every slot in ``params`` (``[n, ...]`` each) on ``x``: returns ``[n, B, out]``.

    ``x`` is ``[B, in]`` shared by all slots, or ``[n, B, in]`` with ``per_slot``.
    Activation and dropout modules are taken from ``template`` (its current mode).
    """
    n = next(iter(params.values())).shape[0]
    if not isinstance(x, torch.Tensor) or x.dim() != (3 if per_slot else 2):
        raise Unsupported("inputs other than [batch, features]")
    values: dict[str, tuple[torch.Tensor, bool]] = {p.input: (x, per_slot)}  # name -> (tensor, has slot dim)
    for step in p.steps:
        h, slotted = values[step.src]
        if step.kind == "linear":
            w, b = params[f"{step.target}.weight"], params.get(f"{step.target}.bias")
            out_f, in_f = w.shape[1], w.shape[2]
            if h.shape[-1] != in_f:
                raise Unsupported("input features do not match")  # vmap's path explains the error
            if slotted:
                out = torch.bmm(h, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            else:
                flat_w = w.reshape(n * out_f, in_f)
                out = h @ flat_w.t() if b is None else torch.addmm(b.reshape(1, n * out_f), h, flat_w.t())
                # [n, B, out] in slot-major memory: later elementwise ops and their backward then see
                # one layout (a transposed view here makes ReLU's backward several times slower)
                out = out.view(h.shape[0], n, out_f).transpose(0, 1).contiguous()
            values[step.dst] = (out, True)
        else:
            fn = template.get_submodule(step.target) if step.kind == "module" else step.target
            if isinstance(fn, nn.Dropout) and not slotted and fn.training and fn.p > 0:
                h, slotted = h.unsqueeze(0).expand(n, *h.shape), True  # one mask per slot, not one for all
            values[step.dst] = (fn(h), slotted)
    out, slotted = values[p.output]
    return out if slotted else out.unsqueeze(0).expand(n, *out.shape)
