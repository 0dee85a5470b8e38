"""ray_modelbatch: train many small PyTorch models as one fused computation.

Where to start:

* a Ray Tune sweep: :func:`ray_modelbatch.tune.batched_trainable` builds a trainable whose
  trials are slots of fused stacks (schedulers, searchers and results stay Tune's);
* without Ray: :class:`ModelBatch` stacks models, :class:`FusedEngine` trains them with a
  :mod:`ray_modelbatch.optim` optimizer, :class:`Trainer` runs a standalone sweep;
* before a sweep: :func:`check_model` reports how a model fuses and how fast.

The fused core (:class:`ModelBatch`, :mod:`ray_modelbatch.optim`, the engine
and the standalone trainer) never imports Ray. Attributes are imported lazily
so that the per-trial Tune proxy (``ray_modelbatch.tune.proxy``) can import
this package without importing torch: that keeps each trial process at about
130 MB instead of 230-370 MB.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelBatch": ".model_batch",
    "FusedEngine": ".engine",
    "StepResult": ".engine",
    "SlotGradScaler": ".amp",
    "Trainer": ".trainer",
    "EarlyStopping": ".trainer",
    "History": ".trainer",
    "SlotWriter": ".tensorboard",
    "SlotSampler": ".data",
    "SharedStream": ".data",
    "PerSlotStreams": ".data",
    "bootstrap": ".data",
    "kfold": ".data",
    "shards": ".data",
    "padded_per_slot": ".data",
    "ModelBatchError": ".errors",
    "FusionError": ".errors",
    "FusionWarning": ".errors",
    "HyperparameterError": ".errors",
    "IncompatibleModelsError": ".errors",
    "InputShapeError": ".errors",
    "OutOfDeviceMemoryError": ".errors",
    "MemoryProfileError": ".errors",
    "CapacityFit": ".capacity",
    "profile_capacity": ".capacity",
    "batched_trainable": ".tune",
    "check_model": ".model_check",
    "clip_grad_norm_": ".slot_clipping",
    "ModelReport": ".model_check",
    "DatasetStreams": ".dataset_streams",
    "IterableStreams": ".iterable_streams",
    "HostTensorStreams": ".host_streams",
}
_SUBMODULES = {"optim", "data", "metrics", "tune", "engine", "amp", "errors", "signature", "trainer", "tensorboard",
               "capacity", "checkpoint", "model_parts"}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'ray_modelbatch' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
