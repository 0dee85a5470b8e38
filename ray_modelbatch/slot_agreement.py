"""Does a fused slot compute what its model computes alone? Measured on one batch, for any model.

The library's promise is that each slot trains exactly as its model would
alone. Its tests check that per layer family, but a user's model combines
layers and settings in ways no test saw, and a fused kernel that got one of
them wrong would not fail: it would train on other numbers. So
:func:`~ray_modelbatch.check_model` runs this comparison on the user's own
model and batch before a sweep:

- **training**: each slot's loss, outputs and parameter gradients of one
  forward and backward in train mode, against the same model run alone
  (dropout and other draws come from the generator state the model alone
  starts from: each slot draws its model's own numbers, see
  :mod:`.slot_random`);
- **evaluation**: each slot's outputs in eval mode (running statistics,
  no dropout).

Each tensor is compared by its largest absolute difference over its largest
absolute value. A gradient's scale is at least a hundredth of the model's
largest gradient: a parameter whose gradient is zero in exact arithmetic (a
convolution's bias before a normalization, an attention key's bias) gets
rounding noise in both runs, up to 4e-4 of its own tiny scale in the models
tried, and is no false alarm then, while a kernel that is wrong is off by
the size of the values themselves. fp32 rounding leaves
1e-7 to 1e-4 here (batched GEMMs sum in other orders than one model's);
a fused kernel that is wrong is off by far more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn

from . import inputs, slot_random
from .model_batch import ModelBatch, copy_model

__all__ = ["Agreement", "compare", "tolerance"]

_SEED = 7919  # any: the slots' generators start where the models' would


@dataclass
class Agreement:
    """The largest relative differences between fused slots and their models alone, and where they were."""

    train: float  # loss, outputs and gradients of a training forward and backward
    train_at: str
    eval: float  # outputs of an evaluation forward
    eval_at: str
    tolerance: float

    @property
    def agrees(self) -> bool:
        return self.train <= self.tolerance and self.eval <= self.tolerance

    def __str__(self) -> str:
        verdict = "agree" if self.agrees else f"DIFFER beyond {self.tolerance:.0e}"

        def part(what: str, value: float, at: str) -> str:
            return f"{what} bit for bit" if value == 0.0 else f"{what} {value:.1e} (largest: {at})"

        return (f"fused slots and the models alone {verdict}: {part('training', self.train, self.train_at)}, "
                f"{part('evaluation', self.eval, self.eval_at)}")


def tolerance(dtype: torch.dtype) -> float:
    """The largest relative difference rounding explains at a parameter dtype (fp32: 1e-3; batched kernels'
    other summation orders left at most 4e-5 on the 29 architectures of ``benchmarks/architecture_survey.py``)."""
    return {torch.float64: 1e-9, torch.float16: 3e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-3)


def compare(models: Sequence[nn.Module], example: Any, loss: Callable[[Any, Any], torch.Tensor], target: Any,
            *, checked: int = 4) -> Agreement:
    """Stack copies of ``models`` and compare the first ``checked`` slots with copies of their models run alone.

    ``example`` is one batch as one model takes it (a tensor, or a dict of keyword inputs); ``loss(output,
    target)`` gives a model's scalar loss. Nothing given is changed, torch's global generator included.
    """
    kept_cpu = torch.get_rng_state()  # (building a stack may draw: its template's initialization)
    alone = [copy_model(m) for m in models[:checked]]
    mb = ModelBatch([copy_model(m) for m in models])
    dtype = next(iter(mb.params.values())).dtype if mb.params else torch.float32
    kept = slot_random.global_state(mb.device) if mb.device.type == "cuda" else kept_cpu
    try:
        states = []
        for i in range(len(models)):
            torch.manual_seed(_SEED + i)
            states.append(slot_random.global_state(mb.device))
            mb.random.set_state(i, states[-1])
        train = _train(mb, alone, states, example, loss, target)
        evaluation = _evaluate(mb, alone, example)
    finally:
        torch.set_rng_state(kept_cpu)
        _set_global_state(mb.device, kept)
    return Agreement(train[0], train[1], evaluation[0], evaluation[1], tolerance(dtype))


def _train(mb: ModelBatch, alone: list[nn.Module], states: list[torch.Tensor], example: Any,
           loss: Callable[[Any, Any], torch.Tensor], target: Any) -> tuple[float, str]:
    """One training forward and backward of the stack, by the path :meth:`FusedEngine.train_step` takes (the
    hand-written MLP step, or the forward with its weight gradients written into the flat buffer), against each
    model's own."""
    mb.train()
    mb.zero_grad()
    names = [n for n, p in mb.params.items() if p.requires_grad]
    out = None
    losses = mb.mlp_train_step(example, target, loss) if isinstance(example, torch.Tensor) else None
    if losses is None:
        with mb.gradients_into_buffer():
            losses, out = mb.forward_loss(example, target, loss)
            losses.sum().backward()
    grads = [mb.params[n].grad for n in names]
    worst = (0.0, "nowhere")
    for i, model in enumerate(alone):
        model.train()
        _set_global_state(mb.device, states[i])
        own_out = inputs.call(model, example)
        own_loss = loss(own_out, target)
        own = dict(model.named_parameters())
        wanted = [n for n in names if n in own]
        own_grads = dict(zip(wanted, torch.autograd.grad(own_loss, [own[n] for n in wanted], allow_unused=True)))
        worst = _worse(worst, (_rel(losses[i], own_loss), f"the loss, slot {i}"))
        if out is not None:  # (the hand-written MLP step returns no outputs: evaluation compares them)
            worst = _worse(worst, _outputs(out, own_out, i))
        scale = max((g.abs().max().item() for g in own_grads.values() if g is not None and g.numel()), default=0.0)
        for n, g in zip(names, grads):
            mine, theirs = (None if g is None else g[i]), own_grads.get(n)
            if mine is None and theirs is None:  # a parameter neither forward used
                continue
            mine = torch.zeros_like(theirs) if mine is None else mine
            theirs = torch.zeros_like(mine) if theirs is None else theirs
            worst = _worse(worst, (_rel(mine, theirs, floor=1e-2 * scale), f"the gradient of '{n}', slot {i}"))
    mb.zero_grad()
    return worst


def _worse(a: tuple[float, str], b: tuple[float, str]) -> tuple[float, str]:
    """The larger difference of two (the first where equal)."""
    return b if b[0] > a[0] else a


def _evaluate(mb: ModelBatch, alone: list[nn.Module], example: Any) -> tuple[float, str]:
    """Each slot's outputs in eval mode against its model's; noise drawn in eval mode (a VAE samples there
    too) starts from the same generator state both ways."""
    mb.eval()
    states = []
    for i in range(mb.num_slots):
        torch.manual_seed(_SEED + 100_003 + i)
        states.append(slot_random.global_state(mb.device))
        mb.random.set_state(i, states[-1])
    worst = (0.0, "nowhere")
    with torch.no_grad():
        out = mb(example)
        for i, model in enumerate(alone):
            model.eval()
            _set_global_state(mb.device, states[i])
            worst = _worse(worst, _outputs(out, inputs.call(model, example), i))
    return worst


def _outputs(fused: Any, own: Any, i: int) -> tuple[float, str]:
    """The largest difference between slot ``i``'s rows of a fused output and the model's own output."""
    mine = [t for t in pytree.tree_leaves(fused) if isinstance(t, torch.Tensor)]
    theirs = [t for t in pytree.tree_leaves(own) if isinstance(t, torch.Tensor)]
    if len(mine) != len(theirs):
        return float("inf"), f"the outputs of slot {i} ({len(mine)} tensors fused, {len(theirs)} alone)"
    worst = (0.0, "nowhere")
    for k, (a, b) in enumerate(zip(mine, theirs)):
        what = "the output" if len(mine) == 1 else f"output {k}"
        if a.dim() == 0 or a.shape[1:] != b.shape:  # a scalar per stack, or no slot row: not comparable
            if a.shape != b.shape:
                return float("inf"), f"{what} of slot {i} (shape {list(a.shape)} fused, {list(b.shape)} alone)"
            worst = _worse(worst, (_rel(a, b), f"{what}, slot {i}"))
            continue
        worst = _worse(worst, (_rel(a[i], b), f"{what}, slot {i}"))
    return worst


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """max|a - b| / max(max|b|, floor): 0 for equal tensors (NaNs at the same places count as equal)."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    both_nan = torch.isnan(a) & torch.isnan(b)
    diff = torch.where(both_nan, 0.0, (a - b).abs())
    if diff.numel() == 0:
        return 0.0
    top = diff.max().item()
    if top == 0.0:
        return 0.0
    if top != top:  # a NaN on one side only
        return float("inf")
    scale = max(torch.where(both_nan, 0.0, b.abs()).max().item(), floor, 1e-30)
    return top / scale


def _set_global_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)
