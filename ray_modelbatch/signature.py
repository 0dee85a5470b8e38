"""Model signatures: the names, shapes and dtypes that decide whether models can share a stack.

Two models fuse only if every parameter and buffer matches. The signature is
cheap to compute (also for models built on the meta device) and hashable, so a
slot host can keep one stack per signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from .errors import IncompatibleModelsError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    kind: str  # "parameter" or "buffer"
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    def describe(self) -> str:
        grad = "" if self.kind == "buffer" else (", trainable" if self.requires_grad else ", frozen")
        return f"{self.kind} '{self.name}' shape {list(self.shape)} {str(self.dtype).replace('torch.', '')}{grad}"


Signature = tuple[TensorSpec, ...]


def module_signature(module: nn.Module) -> Signature:
    """Return the ordered parameter and buffer specs of ``module`` (tied tensors once)."""
    specs = [
        TensorSpec(n, "parameter", tuple(p.shape), p.dtype, p.requires_grad)
        for n, p in module.named_parameters()
    ]
    specs += [TensorSpec(n, "buffer", tuple(b.shape), b.dtype, False) for n, b in module.named_buffers()]
    return tuple(specs)


def first_mismatch(reference: Signature, other: Signature) -> str | None:
    """Describe the first difference between two signatures, or None if they match."""
    ref = {s.name: s for s in reference}
    oth = {s.name: s for s in other}
    for spec in reference:
        o = oth.get(spec.name)
        if o is None:
            return f"{spec.describe()} is missing"
        if o != spec:
            return f"{spec.describe()} differs: got {o.describe()}"
    for spec in other:
        if spec.name not in ref:
            return f"unexpected {spec.describe()}"
    return None


def check_compatible(modules: Iterable[nn.Module], what: str = "slot") -> Signature:
    """Raise :class:`IncompatibleModelsError` naming the first mismatch; return the shared signature."""
    modules = list(modules)
    if not modules:
        raise IncompatibleModelsError("ModelBatch needs at least one model; got an empty sequence.")
    reference = module_signature(modules[0])
    for i, m in enumerate(modules[1:], start=1):
        if type(m) is not type(modules[0]):
            raise IncompatibleModelsError(
                f"{what} {i} is a {type(m).__name__} but {what} 0 is a {type(modules[0]).__name__}; "
                "every model in one batch must be the same class. Put models of different classes "
                "in different ModelBatches."
            )
        problem = first_mismatch(reference, module_signature(m))
        if problem:
            raise IncompatibleModelsError(
                f"{what} {i} does not match {what} 0: {problem}. Models in one batch must have "
                "identical parameter and buffer shapes and dtypes; build them from the same "
                "architecture config, or give shape-changing hyperparameters their own batch."
            )
    return reference
