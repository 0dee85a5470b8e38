"""The square root of an optimizer's second moments, without torch's slow path for zeros, bit for bit.

Why: torch's CPU ``sqrt`` (this build) is not the IEEE instruction but an
approximation with a fix-up, and the fix-up makes exact zeros slow: 104 us
for a ``[8, 9610]`` buffer with 10.7% zeros against 9 us with none, 390 us at
50% (one thread, ``benchmarks/RESULTS.md``, session 42). Second moments hold
exact zeros wherever a parameter's gradient has been 0 at every step so far:
inputs that are always 0 (the border pixels of scikit-learn's digits: 10.7% of
the example sweep's MLP), embedding rows never looked up, the zero rows of a
padded stack. The eager updates of Adam and AdamW (slots under 16k
parameters), NAdam, RAdam, Adagrad and RMSprop each take one such root per
step.

How: ``x.clamp_min(tiny).sqrt_()``, where ``tiny`` is the dtype's smallest
normal number. Every normal ``x`` keeps torch's own root, bit for bit. A zero
or subnormal ``x`` becomes ``sqrt(tiny)`` (1.08e-19 in fp32) instead of torch's
0 (or at most ``sqrt(tiny)``). Each update then divides that root by ``d``
(Adam's ``sqrt(1 - beta2**t)``, else 1) and adds ``eps``, and a value below
half a unit in the last place of ``eps`` vanishes in that addition. So the
denominator, and therefore the update, is torch.optim's exactly whenever

    sqrt(tiny) / d < eps * 2**-(mantissa bits + 2)     (a lower bound on half of eps's last place)

holds for every slot: in fp32, ``eps * d`` above 3.6e-12 (Adam's default
``eps = 1e-8`` with ``beta2 = 0.999`` gives 3.2e-10). Where it does not hold
(``eps = 0``, a tiny ``eps``, fp16 state) the optimizer takes torch's plain
``sqrt``; so does every device but the CPU. The clamp is one more pass, so an
optimizer takes it only while its moments hold enough zeros to pay for it
(``VectorOptimizer._refresh_root_clamp``).
"""

from __future__ import annotations

import torch

_MARGIN = 1.01  # against the rounding of eps and d to the buffer's dtype


def clamp_is_exact(eps_times_divisor: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether ``sqrt(x.clamp_min(tiny)) / d + eps`` equals ``sqrt(x) / d + eps`` bit for bit in ``dtype``, for
    every ``x`` and every slot, given each slot's smallest ``eps * d`` (None: the update has no such ``eps``)."""
    if eps_times_divisor is None or not dtype.is_floating_point:
        return False
    info = torch.finfo(dtype)
    # info.eps is 2**-mantissa_bits: eps * 2**-(mantissa_bits + 2) = eps * info.eps / 4
    need = info.tiny ** 0.5 * 4.0 / info.eps * _MARGIN
    values = eps_times_divisor.double()
    return bool(values.numel() > 0 and torch.isfinite(values).all() and (values > need).all())


def sqrt(x: torch.Tensor, clamp: bool) -> torch.Tensor:
    """``x.sqrt()`` as a new tensor; with ``clamp`` (see :func:`clamp_is_exact`), zeros and subnormals first
    raised to the dtype's smallest normal number, which torch's CPU kernel roots at its fast speed."""
    if clamp:
        return x.clamp_min(torch.finfo(x.dtype).tiny).sqrt_()
    return x.sqrt()


def sqrt_(x: torch.Tensor, clamp: bool) -> torch.Tensor:
    """:func:`sqrt` in place, for a temporary the update owns."""
    if clamp:
        x.clamp_min_(torch.finfo(x.dtype).tiny)
    return x.sqrt_()
