"""torch's weight and spectral normalizations, written with ops ``torch.vmap`` batches.

Both come in two forms: the old hooks (``nn.utils.weight_norm``,
``nn.utils.spectral_norm``, which compute ``weight`` before each forward) and
the parametrizations (``nn.utils.parametrizations.weight_norm`` /
``spectral_norm``). On a stack's vmap path:

- **weight norm** calls ``torch._weight_norm``, which has no batching rule:
  torch ran it once per slot (a ``FusionWarning`` said so). It is
  ``v * (g / ||v||)``, the norm over every dim but ``dim``, and is computed so
  here: the same value up to fp32 rounding.
- **spectral norm** could not train at all. Its power iteration writes each
  step into the ``u``/``v`` buffers with ``F.normalize(..., out=u)``, and vmap
  has no rule for ``div.out`` ("op aten::div.out has no vmap batching rule").
  Here the same normalization is copied into the buffers in place, which vmap
  batches: each slot's ``u``/``v`` move as its model's own, and the forward
  divides by the same ``sigma``.

:func:`adapt` changes only the stack's own copy of the model (the template),
never the user's modules. The direct path never sees these layers: a model
with such hooks or parametrizations runs on vmap's path.
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

__all__ = ["adapt"]

_HOOKS = importlib.import_module("torch.nn.utils.weight_norm"), importlib.import_module("torch.nn.utils.spectral_norm")


def adapt(template: nn.Module) -> None:
    """Have every weight or spectral normalization in ``template`` compute with ops vmap batches."""
    weight_hook, spectral_hook = _HOOKS[0].WeightNorm, _HOOKS[1].SpectralNorm
    for module in template.modules():
        for hook in module._forward_pre_hooks.values():
            if type(hook) is weight_hook:
                hook.compute_weight = types.MethodType(_hook_weight_norm, hook)
            elif type(hook) is spectral_hook:
                hook.compute_weight = types.MethodType(_hook_spectral_norm, hook)
        if type(module) is parametrizations._WeightNorm:
            module.forward = types.MethodType(_weight_norm_forward, module)
        elif type(module) is parametrizations._SpectralNorm:
            module._power_method = types.MethodType(_power_method, module)


def weight_norm(v: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
    """``torch._weight_norm(v, g, dim)``: ``v`` scaled to the norm ``g`` along every dim but ``dim`` (-1: the
    whole tensor's norm)."""
    if dim == -1:
        return v * (g / torch.linalg.vector_norm(v))
    dims = [d for d in range(v.dim()) if d != dim % v.dim()]
    return v * (g / torch.linalg.vector_norm(v, dim=dims, keepdim=True))


def _hook_weight_norm(self: Any, module: nn.Module) -> torch.Tensor:
    return weight_norm(getattr(module, self.name + "_v"), getattr(module, self.name + "_g"), self.dim)


def _weight_norm_forward(self: Any, weight_g: torch.Tensor, weight_v: torch.Tensor) -> torch.Tensor:
    return weight_norm(weight_v, weight_g, self.dim)


def _hook_spectral_norm(self: Any, module: nn.Module, do_power_iteration: bool) -> torch.Tensor:
    """``SpectralNorm.compute_weight`` with the power iteration's results copied into ``u`` and ``v``."""
    weight = getattr(module, self.name + "_orig")
    u = getattr(module, self.name + "_u")
    v = getattr(module, self.name + "_v")
    weight_mat = self.reshape_weight_to_matrix(weight)
    if do_power_iteration:
        with torch.no_grad():
            for _ in range(self.n_power_iterations):
                v.copy_(F.normalize(torch.mv(weight_mat.t(), u), dim=0, eps=self.eps))
                u.copy_(F.normalize(torch.mv(weight_mat, v), dim=0, eps=self.eps))
            if self.n_power_iterations > 0:  # as torch: a second forward must not see the first one's u, v change
                u = u.clone(memory_format=torch.contiguous_format)
                v = v.clone(memory_format=torch.contiguous_format)
    return weight / torch.dot(u, torch.mv(weight_mat, v))


@torch.no_grad()
def _power_method(self: Any, weight_mat: torch.Tensor, n_power_iterations: int) -> None:
    """``_SpectralNorm._power_method`` with each step copied into the ``_u`` and ``_v`` buffers."""
    for _ in range(n_power_iterations):
        self._u.copy_(F.normalize(torch.mv(weight_mat, self._v), dim=0, eps=self.eps))
        self._v.copy_(F.normalize(torch.mv(weight_mat.H, self._u), dim=0, eps=self.eps))
