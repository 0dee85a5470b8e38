"""The training step of an MLP stack written out by hand: forward, loss and backward, no autograd.

Why: a sweep's MLPs are small, so their fused step is bookkeeping, not
arithmetic. For the digits MLP of ``examples/asha_sweep.py`` (64-32-10, 8
slots, batch 64, one CPU thread) the direct path's forward, loss and autograd
backward took 0.94 ms, against about 0.4 ms for the same GEMMs written out
with no autograd: the engine's graph walk, the custom functions' Python and the
loss's backward kernels are most of it. A slot host runs this step ~1,300
times in that sweep, and on a GPU each of those ops is a launch in a step that
is launch-bound.

What it covers (:func:`chain`): a traced forward that is a plain chain of
``nn.Linear`` layers and the activations below (modules, or ``F.relu``-style
functions), with no tied or frozen parameters, on one tensor input of
``[B, I]`` rows (shared by every slot, or ``[n, B, I]`` per slot), trained
with a default-option cross-entropy (``F.cross_entropy`` or an
``nn.CrossEntropyLoss`` with mean reduction, no class weights, no label
smoothing; ``ignore_index`` honoured) against class indices, or a
mean-reduced MSE or L1 loss against targets shaped as the outputs. Anything
else (dropout, normalization, other losses, autocast, a user's
``train_step``, ``cpu_gemm="onednn"``) takes the direct path with autograd,
as before.

Exactness: every slot's rows are its own in every op (batched GEMMs, a
softmax per row, sums per slot), so a slot's numbers do not depend on which
other slots run with it; whole-stack, masked and gathered steps all go
through this one path, so they round alike, and the fused-vs-alone tests hold
to fp32 rounding as before. The cross-entropy's gradient is ``softmax -
one_hot`` scaled by ``1 / (targets counted)``, the same math torch's
``log_softmax``/``nll_loss`` backward does, rounded in another order (last
bits); MSE's is ``2 (out - y) / N``, L1's ``sign(out - y) / N``. The forward
GEMMs are the direct path's, so the reported loss equals the direct path's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .fast_path import FastPlan, GradTarget, _Ref, write_bias_grad, write_weight_grad
from .short_softmax import log_softmax
from .slot_losses import _cross_entropy_ignore_index, _elementwise

__all__ = ["MlpChain", "chain"]

aten = torch.ops.aten

# activation -> (forward on the pre-activation, backward(grad, pre-activation, output)): the aten backward
# kernels autograd itself calls for these functions.
_ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "relu": (torch.relu, lambda g, x, y: aten.threshold_backward(g, y, 0)),
    "tanh": (torch.tanh, lambda g, x, y: aten.tanh_backward(g, y)),
    "sigmoid": (torch.sigmoid, lambda g, x, y: aten.sigmoid_backward(g, y)),
    "silu": (F.silu, lambda g, x, y: aten.silu_backward(g, x)),
    "gelu": (F.gelu, lambda g, x, y: aten.gelu_backward(g, x, approximate="none")),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"),
                  lambda g, x, y: aten.gelu_backward(g, x, approximate="tanh")),
    "identity": (lambda x: x, lambda g, x, y: g),
}
_MODULES = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.Identity: "identity"}
_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid",
              F.sigmoid: "sigmoid", F.silu: "silu"}


@dataclass(frozen=True)
class MlpChain:
    """The layers of a chain MLP in order (``("linear", module name)`` or ``("act", activation name)``) and
    its loss: ``"cross_entropy"`` (with ``ignore_index``), ``"mse"`` or ``"l1"``."""

    layers: tuple[tuple[str, str], ...]
    loss: str
    ignore_index: int = -100

    def accepts(self, x: torch.Tensor, y: torch.Tensor, per_slot: bool) -> bool:
        """Whether the batch has the shapes this step computes: rows of features in, and class indices
        (``[B]`` per slot) or values shaped as the output (``[B, O]`` per slot) as targets."""
        rank = 3 if per_slot else 2
        if x.dim() != rank or x.dtype not in (torch.float32, torch.float64):
            return False
        if self.loss == "cross_entropy":
            return y.dtype == torch.long and y.shape == x.shape[:-1]
        return y.dtype == x.dtype and y.dim() == rank and y.shape[:-1] == x.shape[:-1]

    def step(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             grads: Mapping[str, GradTarget], rows: torch.Tensor | None) -> torch.Tensor | None:
        """Every slot's loss ``[n]``, with the gradients of its weights and biases written into ``grads``
        (None, having written nothing, for targets shaped unlike the outputs).

        ``params`` are the stacked parameters of the ``n`` slots that run
        (``[n, ...]`` each); ``rows`` (None: every slot, in order) says which
        rows of the gradient buffer they are.
        """
        with torch.no_grad():
            n = next(iter(params.values())).shape[0]
            h = x
            saved: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: (its input, its output)
            for kind, name in self.layers:
                if kind == "linear":
                    w, b = params[f"{name}.weight"], params.get(f"{name}.bias")
                    hs = h if h.dim() == 3 else h.unsqueeze(0).expand(n, *h.shape)
                    wt = w.transpose(1, 2)
                    out = torch.bmm(hs, wt) if b is None else torch.baddbmm(b.unsqueeze(1), hs, wt)
                else:
                    out = _ACTIVATIONS[name][0](h)
                saved.append((h, out))
                h = out
            loss = self._loss(h, y, n)
            if loss is None:  # targets shaped unlike the outputs: torch broadcasts (and warns); autograd's path
                return None
            losses, go = loss
            first = next(i for i, (kind, _) in enumerate(self.layers) if kind == "linear")  # x needs no gradient
            for i in range(len(self.layers) - 1, first - 1, -1):
                kind, name = self.layers[i]
                inp, out = saved[i]
                if kind == "act":
                    go = _ACTIVATIONS[name][1](go, inp, out)
                    continue
                w = params[f"{name}.weight"]
                hs = inp if inp.dim() == 3 else inp.unsqueeze(0).expand(n, *inp.shape)
                _write(grads[f"{name}.weight"], go.transpose(1, 2), hs, rows)
                if f"{name}.bias" in params:
                    _write_sum(grads[f"{name}.bias"], go, rows)
                if i > first:
                    go = torch.bmm(go, w)
        return losses

    def _loss(self, out: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Each slot's loss ``[n]`` on its ``[n, B, O]`` outputs, and the loss's gradient by the outputs."""
        target = y if y.dim() == out.dim() - (self.loss == "cross_entropy") else y.unsqueeze(0).expand(n, *y.shape)
        if self.loss != "cross_entropy":  # the mean over each slot's elements, as slot_losses computes it
            if target.shape != out.shape:
                return None
            diff = out - target
            fn = F.mse_loss if self.loss == "mse" else F.l1_loss
            losses = fn(out, target, reduction="none").flatten(1).mean(1)
            scale = 1.0 / diff[0].numel()
            go = diff.mul_(2.0 * scale) if self.loss == "mse" else diff.sign_().mul_(scale)
            return losses, go
        valid = target != self.ignore_index
        if out.device.type == "cpu" and bool(valid.all()):  # (free to ask on a CPU) no target ignored
            return _cross_entropy_all_valid(out, target)
        return _cross_entropy(out, target, valid)


def _cross_entropy(out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slot's mean cross-entropy over its targets that are ``valid`` (not ignored), and its gradient by
    the logits ``out`` (``[n, B, C]``; written into ``out``'s softmax)."""
    picked = torch.where(valid, target, 0).unsqueeze(-1)
    log_p = log_softmax(out)  # (short rows: a transposed view, torch's values to a rounding, 3-7x sooner)
    nll = torch.where(valid, -log_p.gather(-1, picked).squeeze(-1), 0.0)
    count = valid.sum(1)
    losses = nll.sum(1) / count  # as torch's mean: over the targets not ignored
    go = log_p.exp_()  # d loss / d logits = (softmax - one_hot) / count, 0 on ignored rows
    go.scatter_add_(-1, picked, torch.full_like(picked, -1, dtype=go.dtype))
    go.mul_((valid / count.unsqueeze(1)).to(go.dtype).unsqueeze(-1))
    return losses, go


def _cross_entropy_all_valid(out: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_cross_entropy` where no target is ignored: the same values to the bit, in 11 small ops instead
    of 18 (the MLP sweep's fused steps are mostly such ops).

    The general form's ``where``s keep every value (all rows valid), the sum of the negated picks is the
    negated sum (rounding is symmetric), and ``1 / B`` is the float32 quotient it multiplies by.
    """
    batch = target.shape[-1]
    picked = target.unsqueeze(-1)
    log_p = log_softmax(out)  # (short rows: a transposed view, torch's values to a rounding, 3-7x sooner)
    losses = log_p.gather(-1, picked).squeeze(-1).sum(1).neg_().div_(batch)
    go = log_p.exp_()
    go.scatter_add_(-1, picked, _minus_ones(picked.shape, go.dtype))
    go.mul_(_reciprocal(batch))
    return losses, go


_MINUS_ONES: dict[tuple, torch.Tensor] = {}
_RECIPROCALS: dict[int, float] = {}


def _reciprocal(batch: int) -> float:
    """``1 / batch`` rounded to float32, as the general form's ``valid / count`` computes it (made once)."""
    r = _RECIPROCALS.get(batch)
    if r is None:
        r = _RECIPROCALS[batch] = float(torch.ones((), dtype=torch.float32) / batch)
    return r


def _minus_ones(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of -1 of this shape and dtype, made once (read only: ``scatter_add_``'s source)."""
    key = (tuple(shape), dtype)
    t = _MINUS_ONES.get(key)
    if t is None:
        if len(_MINUS_ONES) > 64:
            _MINUS_ONES.clear()
        t = _MINUS_ONES[key] = torch.full(shape, -1, dtype=dtype)
    return t


def _write(target: GradTarget, gt: torch.Tensor, hs: torch.Tensor, rows: torch.Tensor | None) -> None:
    """The weight gradient ``gt @ hs`` of every running slot, into its rows of the flat gradient buffer."""
    view, add = target.take()
    if rows is None:
        write_weight_grad(view, add, gt, hs)
    elif add:
        view.index_add_(0, rows, torch.bmm(gt, hs))
    else:  # the rows that do not run get zeros, as autograd's gather backward gives them
        view.zero_().index_copy_(0, rows, torch.bmm(gt, hs))


def _write_sum(target: GradTarget, go: torch.Tensor, rows: torch.Tensor | None) -> None:
    view, add = target.take()
    if rows is None:
        write_bias_grad(view, add, go)
    elif add:
        view.index_add_(0, rows, go.sum(1))
    else:
        view.zero_().index_copy_(0, rows, go.sum(1))


def _activation(step: Any, template: nn.Module) -> str | None:
    if step.kind == "module":
        mod = template.get_submodule(step.target)
        if type(mod) is nn.GELU:
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(mod.approximate)
        return _MODULES.get(type(mod))
    if step.kind == "function" and all(k == "inplace" for k, _ in step.kwargs):  # (F.relu's inplace: same values)
        return _FUNCTIONS.get(step.target)
    return None


def chain(plan: FastPlan | None, template: nn.Module, loss_fn: Callable[..., Any]) -> MlpChain | None:
    """The hand-written step of this forward and loss, or None where it does not apply (see the module doc)."""
    ignore = _cross_entropy_ignore_index(loss_fn)
    elementwise = _elementwise(loss_fn)
    loss = "cross_entropy" if ignore is not None else {F.mse_loss: "mse", F.l1_loss: "l1"}.get(elementwise)
    if plan is None or loss is None or plan.aliases or len(plan.inputs) != 1 or not plan.steps:
        return None
    layers: list[tuple[str, str]] = []
    prev = plan.inputs[0].name
    for step in plan.steps:
        if step.args != (_Ref(prev),):
            return None
        if step.kind == "linear" and not step.kwargs:
            layers.append(("linear", step.target))
        else:
            act = _activation(step, template)
            if act is None:
                return None
            layers.append(("act", act))
        prev = step.dst
    if prev != plan.output or not any(kind == "linear" for kind, _ in layers):
        return None
    return MlpChain(tuple(layers), loss, -100 if ignore is None else ignore)
