"""A custom kernel's second derivative: the gradients of torch's own op, with a graph of their own.

Why: the fused kernels here (:mod:`.channels_last_group_norm`, :mod:`.padded_channel_conv`,
:mod:`.shared_input_conv`, :mod:`.strided_pointwise_conv`) write their backward by hand for speed, and
a hand-written backward has no derivative. When autograd asks for one (``create_graph=True``: a
gradient penalty), each differentiates the op it replaces instead, so the result is exact torch, at
torch's speed.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["torch_gradients"]


def torch_gradients(op: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor | None], need: Sequence[bool],
                    gy: torch.Tensor) -> list[torch.Tensor | None]:
    """The gradients of ``op(*inputs)`` against ``gy`` for the inputs ``need`` marks (None for the others and
    for inputs that are None), computed with ``create_graph=True``."""
    wanted = [n and t is not None for t, n in zip(inputs, need)]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(op(*inputs), [t for t, w in zip(inputs, wanted) if w], gy,
                                         create_graph=True, allow_unused=True))
    return [next(grads) if w else None for w in wanted]
