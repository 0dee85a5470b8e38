"""Fused convolutions run in full fp32 on CUDA, forward and backward, as each model's own mostly do.

Why: PyTorch lets cuDNN use TF32 for fp32 convolutions by default. For a
model's own small convolutions cuDNN mostly picks full-precision kernels; for
the fused step's grouped convolution over all slots it picks TF32 ones. On an
H200 (torch 2.11, ``benchmarks/RESULTS.md``, session 16) that put the fused
gradients 30 to over 1000 times further from fp64 than each model's own
(small CNN 5.8e-2 against 1.8e-3, LeNet + BatchNorm 1.2e-1 against 5.6e-4,
the digits CNN 1.2e-3 against 8.5e-7), so a slot no longer trained as its
model alone. With TF32 off they matched (1.8e-3 and 1.8e-3; 3.1e-6 and
2.1e-6; 8.9e-7 and 8.4e-7), at about half the speed for the small CNN at 32
slots (8.3x a loop against 16.0x).

So a fused convolution on CUDA runs with cuDNN's TF32 off, unless the user
has allowed TF32 for fp32 matmuls (``torch.set_float32_matmul_precision("high")``
or ``"medium"``): the switch that already says "TF32 is fine" for the fused
step's batched GEMMs, and for the models alone.

How: the forward runs with the flag off; hooks on the convolution's autograd
node turn it off for the node's backward and back on after it (a count, so
nested or concurrent backward nodes restore the user's value once, at the
end). A backward that raises inside the node leaves the flag off: later
convolutions then run more precisely, never less.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

_lock = threading.Lock()
_depth = 0
_saved: Any = None


def _cudnn_conv_flag() -> tuple[Any, str, Any]:
    """(owner, attribute, full-precision value) of cuDNN's TF32 switch for convolutions: the per-operator
    ``torch.backends.cudnn.conv.fp32_precision`` where torch has it (mixing it with the legacy
    ``allow_tf32`` makes torch refuse to read either), else ``torch.backends.cudnn.allow_tf32``."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return conv, "fp32_precision", "ieee"
    return torch.backends.cudnn, "allow_tf32", False


def _enter() -> None:
    global _depth, _saved
    owner, name, full = _cudnn_conv_flag()
    with _lock:
        if _depth == 0:
            _saved = getattr(owner, name)
        _depth += 1
        setattr(owner, name, full)


def _exit() -> None:
    global _depth
    owner, name, _ = _cudnn_conv_flag()
    with _lock:
        _depth -= 1
        if _depth == 0:
            setattr(owner, name, _saved)


def needs_full_precision(t: torch.Tensor) -> bool:
    """Whether a fused convolution of ``t`` must keep cuDNN from TF32: on CUDA, unless the user allows
    TF32 for fp32 matmuls."""
    return t.is_cuda and t.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"


def full_precision(conv: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``conv()`` with cuDNN's TF32 off for its forward and, through hooks on its autograd node, for its
    backward."""
    _enter()
    try:
        out = conv()
    finally:
        _exit()
    node = out.grad_fn
    if node is not None:
        node.register_prehook(lambda grad_outputs: _enter())
        node.register_hook(lambda grad_inputs, grad_outputs: _exit())
    return out
