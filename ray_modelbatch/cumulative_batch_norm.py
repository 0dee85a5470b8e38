"""BatchNorm with ``momentum=None`` (a cumulative average of the batch statistics) under ``torch.vmap``.

With ``momentum=None`` torch's BatchNorm averages every batch's statistics
equally: each training forward counts the batch in ``num_batches_tracked`` and
uses ``1 / count`` as the update factor, which it reads as a Python number
(``float(self.num_batches_tracked)``). vmap cannot read one slot's count as a
number, so such a model failed with "it calls .item() ... inside forward", an
error the user could do nothing about. Each slot may also have its own count
(a slot taken over by a new trial starts again at 0).

The stack's copy (the template) of such a layer normalizes with the batch's
own statistics, as torch does in training, and updates the running
statistics with each slot's factor as a tensor: ``running = (1 - f) * running
+ f * batch`` (the variance unbiased, as torch keeps it). The same values as
torch's up to fp32 rounding. :func:`adapt` changes only the template.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["adapt"]


def adapt(template: nn.Module) -> None:
    """Give every BatchNorm of ``template`` that keeps a cumulative average a forward vmap batches."""
    for module in template.modules():
        if (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.momentum is None
                and module.track_running_stats and type(module).forward is nn.modules.batchnorm._BatchNorm.forward):
            module.forward = types.MethodType(_forward, module)


def _forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    self._check_input_dim(x)
    if not self.training:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
    out = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
    with torch.no_grad():
        self.num_batches_tracked.add_(1)
        factor = 1.0 / self.num_batches_tracked.to(x.dtype)
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x, dim=dims, correction=1)
        self.running_mean.mul_(1 - factor).add_(mean * factor)
        self.running_var.mul_(1 - factor).add_(var * factor)
    return out
