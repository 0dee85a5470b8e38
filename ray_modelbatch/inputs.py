"""Batches that are one tensor or a dict of keyword tensors: the same row operations for both.

A plain model is called ``model(x)``. A Hugging Face model is called with
keyword tensors, ``model(input_ids=..., attention_mask=..., labels=...)``, and
its users' batches are dicts of such columns (what a tokenizer returns). Every
part that moves training data (streams, chunked steps, validation rows,
evaluation) only selects, slices, counts and moves *rows*; these helpers do that
to a tensor, to every column of a dict (each column a tensor with one row per
example), and pass ``None`` through: a batch whose labels are one of its columns
has no separate target.

The convention, everywhere a batch meets a model:

- ``x`` a tensor: ``model(x)``; ``x`` a dict: ``model(**x)`` (:func:`call`).
- A user's step gets ``(x, y)``, or ``x`` alone when there is no ``y``
  (:func:`step_batch`): an HF user's step is ``model(**batch).loss``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

__all__ = ["is_columns", "apply", "leaves", "num_rows", "describe", "integer_valued", "value_range", "call", "call_args",
           "step_batch", "tensors"]


def is_columns(x: Any) -> bool:
    """Whether ``x`` is a dict of columns (any mapping: a tokenizer's ``BatchEncoding`` is one)."""
    # A tensor first: the abstract-class check costs microseconds, and a fused step asks a dozen times.
    return not isinstance(x, torch.Tensor) and isinstance(x, Mapping)


def apply(fn: Callable[[torch.Tensor], torch.Tensor], x: Any) -> Any:
    """``fn`` applied to a tensor, to every column of a dict (a plain ``dict`` comes back), or ``None``."""
    if x is None:
        return None
    if is_columns(x):
        return {k: fn(v) for k, v in x.items()}
    return fn(x)


def leaves(x: Any) -> list[torch.Tensor]:
    """The tensors of a batch: ``[x]``, the dict's columns, or none."""
    if x is None:
        return []
    return list(x.values()) if is_columns(x) else [x]


def num_rows(x: Any, dim: int = 0, what: str = "x") -> int:
    """Rows of a batch along ``dim``; every column of a dict must have the same number (one clear line if not)."""
    if is_columns(x):
        if not x:
            raise ValueError(f"{what} is an empty dict; give at least one column (e.g. 'input_ids').")
        sizes = {k: (v.shape[dim] if isinstance(v, torch.Tensor) and v.dim() > dim else None) for k, v in x.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"the columns of {what} must be tensors with the same number of rows; got {describe(x)}. "
                             "Fix: pad every column to one length per example (a tokenizer's padding=True does).")
        return int(next(iter(sizes.values())))
    return int(x.shape[dim])


def describe(x: Any) -> str:
    """Shapes of a batch for an error message: ``(2, 8)`` or ``{input_ids: (2, 8), labels: (2,)}``."""
    if x is None:
        return "None"
    if is_columns(x):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in x.items()) + "}"
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def integer_valued(t: torch.Tensor) -> bool:
    """Whether ``t`` holds integers (class labels, token ids): not floating point, complex or bool."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def value_range(t: torch.Tensor) -> str:
    """``", values a to b"`` for a tensor of integers (labels), ``""`` otherwise: for an error message."""
    if t.numel() == 0 or not integer_valued(t):
        return ""
    return f", values {int(t.min())} to {int(t.max())}"


def call_args(x: Any, args: tuple = (), kwargs: Mapping[str, Any] | None = None) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the model call: ``model(x, *args, **kwargs)``, or ``model(**x, **kwargs)`` when
    ``x`` is a dict of keyword inputs."""
    kwargs = dict(kwargs or {})
    if is_columns(x):
        if args:
            raise TypeError("a dict batch is passed to the model as keyword inputs (model(**batch)); pass the other "
                            "inputs as keywords too, not positionally.")
        both = sorted(set(x) & set(kwargs))
        if both:
            raise TypeError(f"keyword inputs {both} are given both in the batch and as keywords; give each once.")
        return (), {**x, **kwargs}
    return (x, *args), kwargs


def call(model: Callable[..., Any], x: Any, args: tuple = (), kwargs: Mapping[str, Any] | None = None) -> Any:
    """``model(x, *args, **kwargs)``, or ``model(**x, **kwargs)`` when ``x`` is a dict of keyword inputs."""
    a, k = call_args(x, args, kwargs)
    return model(*a, **k)


def step_batch(x: Any, y: Any) -> Any:
    """What a user's step receives: ``(x, y)``, or ``x`` alone when the targets are inside it (``y`` is None).
    A mapping becomes a plain dict (a tokenizer's ``BatchEncoding`` is not a pytree torch.vmap can split)."""
    x = dict(x) if is_columns(x) else x
    return x if y is None else (x, y)


def tensors(x: Any, what: str, device: torch.device | str, fix: str = "return tensors or arrays") -> Any:
    """A tensor or a dict of columns as tensors on ``device`` (``torch.as_tensor`` per column); ``None`` stays."""

    def one(v: Any, name: str) -> torch.Tensor:
        try:
            return torch.as_tensor(v).to(device)
        except Exception as exc:  # noqa: BLE001 - anything torch cannot take: say which item or column
            raise TypeError(f"data() item {name} is a {type(v).__name__} that torch.as_tensor cannot take "
                            f"({exc}). Fix: {fix}.") from None

    if x is None:
        return None
    if is_columns(x):
        return {str(k): one(v, f"{what}[{k!r}]") for k, v in x.items()}
    return one(x, what)
