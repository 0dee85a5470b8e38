"""Vectorized optimizers: one fused update for every slot, per-slot hyperparameters as tensors."""

from . import schedules
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .base import VectorOptimizer
from .nadam import NAdam
from .radam import RAdam
from .rmsprop import RMSprop
from .schedules import Plateau, Schedule
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "VectorOptimizer",
           "Schedule", "Plateau", "schedules"]
