"""Errors raised by ray_modelbatch.

Each one says what went wrong *and* what to do about it, because the people
who see them are running sweeps, not debugging torch internals.
"""

from __future__ import annotations

import sys


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


class SlotHostLostError(ModelBatchError, RuntimeError):
    """The slot host holding a trial's slot died (a crash, a kill, a lost node)."""


class SlotHostStartError(ModelBatchError, RuntimeError):
    """A slot host could not start: its ``data()`` raised, or not one slot fits its device."""


class SweepSetupError(SlotHostStartError):
    """The sweep's own functions fail the same way for every trial (``data()`` returned the wrong items, the
    loss does not fit the labels...): the first trial reports it and the sweep stops, instead of every trial
    failing with the same message."""


class TrialConfigError(ModelBatchError, KeyError):
    """A trial's config lacks a key, or has a value, that the user's factories need."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class OutOfDeviceMemoryError(ModelBatchError, RuntimeError):
    """Not even one slot of a model fits in the device's memory (or what is left of it)."""


class MemoryProfileError(ModelBatchError, RuntimeError):
    """This process cannot measure its peak memory, so capacity cannot be profiled."""


_OOM_MESSAGES = ("out of memory", "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is an allocator failure.

    CUDA raises ``torch.OutOfMemoryError``; the CPU allocator raises a plain
    RuntimeError ("can't allocate memory"), and wrappers may chain either
    (``raise ... from exc``), so the cause chain is walked. Torch is not
    imported here: proxies import this module and must stay torch-free.
    """
    torch = sys.modules.get("torch")
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if oom_type is not None and isinstance(exc, oom_type):
            return True
        if isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES):
            return True
        exc = exc.__cause__
    return False
