"""Errors raised by ray_modelbatch.

Each one says what went wrong *and* what to do about it, because the people
who see them are running sweeps, not debugging torch internals.
"""

from __future__ import annotations


class ModelBatchError(Exception):
    """Base class for every error ray_modelbatch raises on purpose."""


class IncompatibleModelsError(ModelBatchError, ValueError):
    """Models given to one batch do not share parameter/buffer names, shapes or dtypes."""


class FusionError(ModelBatchError, RuntimeError):
    """A model's forward cannot run under ``torch.vmap`` (the fused path)."""


class FusionWarning(UserWarning):
    """A model runs under vmap, but one op falls back to a slow per-slot loop."""


class HyperparameterError(ModelBatchError, ValueError):
    """A hyperparameter is out of range or has the wrong number of slots."""


class InputShapeError(ModelBatchError, ValueError):
    """A batch's shape does not fit the model (found while running the fused forward)."""
