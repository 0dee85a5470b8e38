"""ray_modelbatch: train many small PyTorch models as one fused computation.

The fused core (:class:`ModelBatch`, :mod:`ray_modelbatch.optim`, the engine
and the standalone trainer) never imports Ray.
"""

from . import optim
from .amp import SlotGradScaler
from .engine import FusedEngine, StepResult
from .errors import (
    FusionError,
    FusionWarning,
    HyperparameterError,
    IncompatibleModelsError,
    InputShapeError,
    ModelBatchError,
)
from .model_batch import ModelBatch

__all__ = [
    "ModelBatch",
    "FusedEngine",
    "StepResult",
    "SlotGradScaler",
    "optim",
    "FusionError",
    "FusionWarning",
    "HyperparameterError",
    "IncompatibleModelsError",
    "InputShapeError",
    "ModelBatchError",
]
__version__ = "0.1.0"
