"""Ray Tune integration: every slot of a fused stack is a real Tune trial.

Import cost matters here: the per-trial proxy imports this package, so it must
not import torch. Heavy pieces load lazily.
"""

from __future__ import annotations

from .trainable import FreeSlotLimiter, batched_trainable

__all__ = ["batched_trainable", "FreeSlotLimiter"]
