"""Cross-entropy over wide rows (a language model's vocabulary) without two logits-sized tensors, on a CPU.

Why: a stack's logits are every slot's logits at once: a GPT-2 language
model of vocabulary 2,000 at batch 64 x 16 tokens has 8 MB of them per slot,
262 MB at 32 slots (a 50,257-token vocabulary: 6.6 GB). ``F.cross_entropy``'s
backward builds ``nll_loss``'s gradient as a dense logits-sized tensor that
is zero but for one value a row (under vmap two of them: zeros, then a
scatter into a copy) before ``log_softmax``'s backward reads it.

How: the forward is torch's ``log_softmax`` and the gather of each row's
target. The backward builds that one-hot gradient for one cache-sized piece
of rows at a time (:data:`PIECE_BYTES`) in a small buffer, and runs torch's
``log_softmax`` backward kernel on each piece into the piece's rows of the
logits' gradient. That kernel works row by row, so every row gets the bits
torch's whole-tensor call gives it, losses and gradients alike
(``tests/test_wide_cross_entropy.py``): taking this path never changes a
slot's bits. Measured by ``benchmarks/wide_cross_entropy.py`` on 2 shared
Xeon cores (GPT-2 of 2 layers of 64, vocab 2,000, batch 64 x 16 tokens, Adam;
the same parameters to the bit both ways): peak memory 1,900 against 2,170 MB
at 32 slots and 6,482 against 7,450 MB at 128, fused steps 1.02-1.04x sooner
at 8, 32 and 128 slots.

Where: a stack's per-slot cross-entropy (:mod:`.slot_losses`), and any
``F.cross_entropy`` call on a vmap's batched logits while a stack's vmapped
function runs (:func:`batched_cross_entropy`): a user's loss function, and the
loss transformers models compute from ``labels=``. Other calls (class
weights, label smoothing, probabilities as targets, logits of other than 2
dimensions, rows shorter than a vector register, small logits, other
devices, outside a stack's vmap) go to torch's function unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .name_swap import NameSwap
from .short_softmax import short_rows

__all__ = ["applies", "batched_cross_entropy", "row_losses"]

#: bytes of logits per piece of the backward: its two buffers fit a core's L2 cache
PIECE_BYTES = 1 << 20
#: one slot's logits smaller than this take torch's own call: where all slots' logits stay in cache, the pieces
#: gain nothing (32,768 rows of 2,000 classes 1.08x, of 100 classes, 26 MB, 0.91x; at 0.5-2 MB 0.49-0.70x)
MIN_BYTES = 1 << 20

_TORCH_CROSS_ENTROPY = F.cross_entropy
_is_batched = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)


def applies(logits: torch.Tensor, target: torch.Tensor) -> bool:
    """Whether :func:`row_losses` takes one slot's ``[R, C]`` logits and ``[R]`` class indices: CPU float
    rows a vector register or longer, at least :data:`MIN_BYTES` of them."""
    return (logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64) and logits.dim() == 2
            and not short_rows(logits) and target.dtype == torch.long and target.dim() == 1
            and target.shape[0] == logits.shape[0] and logits.numel() * logits.element_size() >= MIN_BYTES)


def _piece_rows(classes: int, itemsize: int) -> int:
    return max(1, PIECE_BYTES // (classes * itemsize))


def _pieces(rows: int, classes: int, itemsize: int) -> Iterator[tuple[int, int]]:
    step = _piece_rows(classes, itemsize)
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def _targets(target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, index)``: the rows not ignored, and each row's target column (0 for ignored rows) as ``[R, 1]``."""
    keep = target != ignore_index
    return keep, target.masked_fill(~keep, 0).unsqueeze(1)


class _WideRows(torch.autograd.Function):
    """Per-row cross-entropies of ``[R, C]`` logits (``reduction="none"``), the backward in pieces (module
    docstring)."""

    @staticmethod
    def forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(logits, 1)
        keep, index = _targets(target, ignore_index)
        try:
            losses = logp.gather(1, index).squeeze(1)
        except RuntimeError:  # a target out of range: torch's own call says so in its words
            _TORCH_CROSS_ENTROPY(logits, target, reduction="none", ignore_index=ignore_index)
            raise
        return losses.neg_().masked_fill_(~keep, 0), logp

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        logits, target, ignore_index = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no gradient flows to the log-probabilities: no zeros of their size
        ctx.save_for_backward(logits, target, output[1])
        ctx.save_for_forward(logits, target, output[1])
        ctx.ignore_index = ignore_index

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _: Any) -> tuple[Any, ...]:
        logits, target, logp = ctx.saved_tensors
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None, None
        if torch.is_grad_enabled():  # a graph of the gradient (double backward): torch's own, differentiable
            with torch.enable_grad():
                losses = _TORCH_CROSS_ENTROPY(logits, target, reduction="none", ignore_index=ctx.ignore_index)
                return torch.autograd.grad(losses, logits, grad, create_graph=True)[0], None, None
        rows, classes = logp.shape
        keep, index = _targets(target, ctx.ignore_index)
        # nll_loss's backward: -grad at each row's target, nothing for ignored rows
        values = grad.neg().masked_fill_(~keep, 0).unsqueeze(1)
        out = torch.empty_like(logp)
        onehot = logp.new_zeros(min(rows, _piece_rows(classes, logp.element_size())), classes)
        for a, b in _pieces(rows, classes, logp.element_size()):
            hot = onehot[:b - a].scatter_(1, index[a:b], values[a:b])
            torch.ops.aten._log_softmax_backward_data.out(hot, logp[a:b], 1, logp.dtype, out=out[a:b])
            hot.scatter_(1, index[a:b], 0.0)  # zeros again for the next piece
        return out, None, None

    @staticmethod
    def jvp(ctx: Any, tangent: torch.Tensor, *_: Any) -> tuple[torch.Tensor, None]:
        """Forward mode (``torch.func.jvp``): ``sum(softmax * t) - t[target]`` a row, 0 for ignored rows."""
        _, target, logp = ctx.saved_tensors
        keep, index = _targets(target, ctx.ignore_index)
        losses = (logp.exp() * tangent).sum(1) - tangent.gather(1, index).squeeze(1)
        return losses.masked_fill(~keep, 0), None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple:
        """Every slot's rows as rows of one call: ``[S, R, C]`` as ``[S*R, C]``."""
        logits_dim, target_dim = in_dims[0], in_dims[1]
        if logits_dim is None:  # one model's logits, slots' targets: each slot's losses of the same logits
            logits = logits.unsqueeze(0).expand(info.batch_size, *logits.shape)
        else:
            logits = logits.movedim(logits_dim, 0)
        target = (target.unsqueeze(0).expand(info.batch_size, *target.shape) if target_dim is None
                  else target.movedim(target_dim, 0))
        s, r, c = logits.shape
        losses, logp = _WideRows.apply(logits.reshape(s * r, c), target.reshape(s * r), ignore_index)
        return (losses.view(s, r), logp.view(s, r, c)), (0, 0)


def row_losses(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy(logits, target, reduction="none", ignore_index=ignore_index)`` of ``[R, C]`` logits,
    to the bit, in cache-sized pieces (module docstring). Differentiable, twice too."""
    return _WideRows.apply(logits, target, ignore_index)[0]


def _cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                   size_average: Any = None, ignore_index: int = -100, reduce: Any = None,
                   reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    batched = (_is_batched is not None and isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)
               and (_is_batched(input) or _is_batched(target)))
    if (batched and weight is None and size_average is None and reduce is None and label_smoothing == 0.0
            and reduction in ("mean", "sum", "none") and applies(input, target)):
        losses = row_losses(input, target, ignore_index)
        if reduction == "none":
            return losses
        if reduction == "sum":
            return losses.sum()
        return losses.sum() / (target != ignore_index).sum()  # torch's mean: over the targets not ignored
    return _TORCH_CROSS_ENTROPY(input, target, weight=weight, size_average=size_average, ignore_index=ignore_index,
                                reduce=reduce, reduction=reduction, label_smoothing=label_smoothing)


_SWAP = NameSwap(F, "cross_entropy", _cross_entropy)


def batched_cross_entropy() -> contextlib.AbstractContextManager[None]:
    """Within this block, ``F.cross_entropy`` on a vmap's batched wide logits runs as :func:`row_losses` (module
    docstring). Nests, and holds across threads: torch's function is back once the last block ends."""
    return _SWAP.block()


def active() -> bool:
    """Whether a :func:`batched_cross_entropy` block is open (for tests)."""
    return _SWAP.active
