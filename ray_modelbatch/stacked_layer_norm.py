"""``nn.LayerNorm`` in a stack's template: the normalization in torch's faster CPU kernel, each slot's affine after.

Why: under ``torch.vmap`` with one weight and bias per slot, torch's batching
rule for ``F.layer_norm`` normalizes with no affine (``native_layer_norm(x,
shape, None, None)``), then multiplies by the slots' weights and adds their
biases. On a CPU, torch's kernel is slower without a weight than with one:
a weight of ones gives the same values (bit-equal forward and backward at
every shape tested but one, ``[5, 1, 13]`` normalized over its last two
dims in fp32, which differs by rounding) 13-33% sooner in fp32, 1-7% in fp64
(measured on 2 shared cores, forward and backward: ``[32768, 64]`` 3.24
against 2.54 ms, ``[8192, 128]`` 1.41 against 0.95 ms, ``[4096, 768]`` 4.16
against 3.63 ms; ``benchmarks/RESULTS.md``, session 32). A 32-slot
tiny BERT normalizes five times a step.

:func:`stack_layer_norms` makes each plain ``nn.LayerNorm`` of a stack's
template a :class:`StackedLayerNorm`, whose forward under vmap (its weight
batched, so one per slot) is the rule's own decomposition with that weight of
ones: the same operations in the same order after the normalization, so each
slot still rounds as the rule did. Anywhere else (a weight that is not
batched, another device) it is ``nn.LayerNorm``'s own forward. The user's
own modules are not touched; the direct path computes these modules with
:func:`normalize` too (:func:`.direct_kernels.layer_norm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch._C._functorch import is_batchedtensor
except ImportError:  # a torch without functorch's internals: the module's own forward everywhere
    def is_batchedtensor(t: torch.Tensor) -> bool:  # noqa: ARG001
        return False

__all__ = ["StackedLayerNorm", "normalize", "stack_layer_norms"]

_ONES: dict[tuple, torch.Tensor] = {}  # (shape, dtype) -> the CPU weight of ones (never written: F.layer_norm reads it)


def normalize(x: torch.Tensor, shape: tuple[int, ...] | torch.Size, eps: float) -> torch.Tensor:
    """``F.layer_norm(x, shape, None, None, eps)``: with a weight of ones on a CPU, where that kernel is faster
    (see the module docstring)."""
    if x.device.type != "cpu":
        return F.layer_norm(x, shape, None, None, eps)
    key = (tuple(shape), x.dtype)
    ones = _ONES.get(key)
    if ones is None:
        with torch.inference_mode(False):  # made in inference mode, autograd could not save it in training later
            ones = _ONES[key] = torch.ones(key[0], dtype=x.dtype)
    return F.layer_norm(x, shape, ones, None, eps)


class StackedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose per-slot affine under vmap follows a faster normalization (module docstring)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.LayerNorm's own name
        w, b = self.weight, self.bias
        if input.device.type != "cpu" or w is None or not is_batchedtensor(w):
            return super().forward(input)
        y = normalize(input, self.normalized_shape, self.eps) * w
        return y if b is None else y + b


def stack_layer_norms(model: nn.Module) -> nn.Module:
    """Make every plain ``nn.LayerNorm`` of ``model`` (in place) a :class:`StackedLayerNorm`; subclasses of
    ``nn.LayerNorm`` keep their own forward."""
    for module in model.modules():
        if type(module) is nn.LayerNorm:
            module.__class__ = StackedLayerNorm
    return model
