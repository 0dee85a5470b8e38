"""ray_modelbatch: train many small PyTorch models as one fused computation.

The fused core (:class:`ModelBatch`, :mod:`ray_modelbatch.optim`, the engine
and the standalone trainer) never imports Ray.
"""

from . import data, metrics, optim
from .amp import SlotGradScaler
from .data import PerSlotStreams, SharedStream, SlotSampler, bootstrap, kfold, padded_per_slot, shards
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
from .tensorboard import SlotWriter
from .trainer import EarlyStopping, History, Trainer

__all__ = [
    "ModelBatch",
    "FusedEngine",
    "StepResult",
    "SlotGradScaler",
    "optim",
    "data",
    "metrics",
    "SlotSampler",
    "SharedStream",
    "PerSlotStreams",
    "bootstrap",
    "kfold",
    "shards",
    "padded_per_slot",
    "Trainer",
    "EarlyStopping",
    "History",
    "SlotWriter",
    "FusionError",
    "FusionWarning",
    "HyperparameterError",
    "IncompatibleModelsError",
    "InputShapeError",
    "ModelBatchError",
]
__version__ = "0.1.0"
