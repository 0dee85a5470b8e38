"""Trial configs inside a fused user step: which values are per-slot tensors and which split stacks.

A ``train_step(model, batch, config)`` is written for one model and one
config, but a fused step runs it once, under ``torch.vmap``, for every slot of
a stack. The config values it reads are therefore of two kinds:

- **float values** (a regularization weight, a noise scale) become one
  ``[S]`` tensor, so each slot sees its own value as a 0-dim tensor inside
  the step. Arithmetic with them is what it would be with the Python float
  (in the model's dtype), so slots with different values still share a stack.
- **every other value** the step reads (ints, bools, strings, lists) may
  shape the computation (``range(config["n_critic"])``, ``if config["mixup"]``),
  so all slots of a stack must agree on it: it becomes part of the stack's
  identity, and trials that differ in it train in different stacks. A float
  key used in Python control flow can be listed in ``stack_by`` for the same
  treatment.

Which keys a step reads is found once per model signature, by running the
step on two validation rows with a config that records every key read
(:class:`RecordingConfig`). Nested dicts are followed; a key is a path
(a tuple of keys).
"""

from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping, Sequence

import torch

Path = tuple


class RecordingConfig(dict):
    """A dict that records the paths of the values read from it (nested dicts are recorded too)."""

    def __init__(self, data: Mapping[str, Any], reads: set, prefix: Path = ()):
        super().__init__(data)
        self._reads, self._prefix = reads, prefix

    def _wrap(self, key: Any, value: Any) -> Any:
        path = (*self._prefix, key)
        if isinstance(value, Mapping):
            return RecordingConfig(value, self._reads, path)
        self._reads.add(path)
        return value

    def __getitem__(self, key: Any) -> Any:
        return self._wrap(key, super().__getitem__(key))

    def get(self, key: Any, default: Any = None) -> Any:
        if key in self:
            return self[key]
        self._reads.add((*self._prefix, key))
        return default

    def __iter__(self):  # noqa: ANN204 - also sends dict(config) and {**config} through __getitem__
        return iter(list(super().keys()))

    def copy(self) -> dict:
        return {k: self[k] for k in super().keys()}

    def items(self):  # noqa: ANN201 - dict's own view type
        return [(k, self[k]) for k in super().keys()]

    def values(self):  # noqa: ANN201
        return [self[k] for k in super().keys()]


def lookup(config: Mapping[str, Any], path: Path, default: Any = None) -> Any:
    """The value at ``path`` in a nested config, or ``default`` when a key on the way is missing."""
    node: Any = config
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def _is_float(value: Any) -> bool:
    return isinstance(value, float) and not isinstance(value, bool)


def tensor_paths(reads: Iterable[Path], configs: Sequence[Mapping[str, Any]], stack_by: Iterable[str] = ()) -> list:
    """The read paths that become per-slot tensors: float in every config, not named in ``stack_by``."""
    pinned = {tuple(k.split(".")) if isinstance(k, str) else tuple(k) for k in stack_by}
    out = []
    for path in sorted(reads, key=repr):
        if path in pinned or path[:1] in pinned:
            continue
        values = [lookup(c, path) for c in configs]
        if values and all(_is_float(v) or (isinstance(v, int) and not isinstance(v, bool)) for v in values) and any(
                _is_float(v) for v in values):
            out.append(path)
    return out


def static_part(reads: Iterable[Path], config: Mapping[str, Any], floats: Iterable[Path]) -> tuple:
    """``(path, repr(value))`` of every read value that is not a per-slot tensor: equal within a stack."""
    floats = set(floats)
    return tuple((p, repr(lookup(config, p, "<missing>"))) for p in sorted(reads, key=repr) if p not in floats)


def stacked_values(paths: Sequence[Path], configs: Sequence[Mapping[str, Any] | None], dtype: torch.dtype,
                   device: torch.device) -> dict[Path, torch.Tensor]:
    """One ``[n]`` tensor per path, row ``i`` from ``configs[i]`` (a missing config gives 0: a masked row)."""
    out = {}
    for path in paths:
        vals = [0.0 if c is None else float(lookup(c, path, 0.0)) for c in configs]
        out[path] = torch.tensor(vals, dtype=dtype, device=device)
    return out


def with_values(config: Mapping[str, Any], values: Mapping[Path, Any]) -> dict:
    """A copy of ``config`` whose values at the given paths are replaced (nested dicts copied on the way)."""
    if not values:
        return config if isinstance(config, dict) else dict(config)
    out = copy.copy(dict(config))
    for path, value in values.items():
        node = out
        for key in path[:-1]:
            node[key] = dict(node[key])
            node = node[key]
        node[path[-1]] = value
    return out


def value_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-slot config values: the model's, but at least float32 (a Python float is exact
    to float32 rounding in half-precision arithmetic, since torch computes it in float32)."""
    return param_dtype if param_dtype in (torch.float32, torch.float64) else torch.float32


class SlotConfigs:
    """Each slot's trial config, and what a fused step over some of the slots passes to the user's step.

    ``float_paths`` are the paths whose values are per-slot tensors (see the
    module docstring); every other value the step reads is equal within the
    stack, so the config of any held slot serves as the shared config.
    """

    def __init__(self, capacity: int, float_paths: Sequence[Path], dtype: torch.dtype, device: torch.device):
        self.configs: list[Mapping[str, Any] | None] = [None] * capacity
        self.float_paths = list(float_paths)
        self.dtype, self.device = dtype, torch.device(device)
        self._values: dict[Path, torch.Tensor] = {}
        self._refresh()

    def _refresh(self) -> None:
        self._values = stacked_values(self.float_paths, self.configs, self.dtype, self.device)

    def set(self, slot: int, config: Mapping[str, Any] | None) -> None:
        self.configs[slot] = config
        for path, v in self._values.items():
            v[slot] = 0.0 if config is None else float(lookup(config, path, 0.0))

    def resize(self, keep: Sequence[int], capacity: int) -> None:
        self.configs = [self.configs[k] for k in keep] + [None] * (capacity - len(keep))
        self._refresh()

    def for_rows(self, idx: torch.Tensor | None) -> tuple[Mapping[str, Any], dict[Path, torch.Tensor]]:
        """``(shared config, {path: [n] values})`` for the slots ``idx`` (None: every slot, in order)."""
        shared = next((c for c in self.configs if c is not None), {})
        if idx is None:
            return shared, self._values
        return shared, {p: v.index_select(0, idx.to(v.device)) for p, v in self._values.items()}
