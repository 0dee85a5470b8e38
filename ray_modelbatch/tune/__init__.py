"""Ray Tune integration: every slot of a fused stack is a real Tune trial.

* :func:`batched_trainable` builds the trainable: ``tune.Tuner(batched_trainable(model=...,
  optimizer=..., hparams=..., data=..., loss=...), param_space=...)``;
* :class:`SweepProgress` is a Tune callback that prints the sweep's and the hosts' progress;
* :class:`FreeSlotLimiter` wraps a searcher so it suggests only when a slot is free.

Import cost matters here. The per-trial proxy imports this package, so it
must not import torch; the registry and the slot hosts import it too, and
they need neither ``ray.tune`` (0.7 s per process on a 2-core node) nor the
proxy. So the public names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["batched_trainable", "FreeSlotLimiter", "SweepProgress"]
_HOME = {"batched_trainable": ".trainable", "FreeSlotLimiter": ".trainable", "SweepProgress": ".progress"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
