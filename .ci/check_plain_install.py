"""Import every module of ray_modelbatch and its public names, as a plain `pip install .` leaves them.

Run by .ci/run in a fresh virtual environment without the dev extras, so an
undeclared runtime import (issue 12: `cloudpickle`) fails CI, not a user.
"""

import importlib
import pkgutil

import ray_modelbatch

names = [m.name for m in pkgutil.walk_packages(ray_modelbatch.__path__, "ray_modelbatch.")]
for name in names:
    importlib.import_module(name)
from ray_modelbatch.tune import FreeSlotLimiter, SweepProgress, batched_trainable  # noqa: E402,F401

print(f"plain install: imported {len(names) + 1} modules of ray_modelbatch {ray_modelbatch.__version__}")
