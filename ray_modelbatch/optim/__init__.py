"""Vectorized optimizers: one fused update for every slot, per-slot hyperparameters as tensors."""

from . import schedules
from .adam import Adam, AdamW
from .base import VectorOptimizer
from .schedules import Schedule
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "VectorOptimizer", "Schedule", "schedules"]
