"""Each slot's own dropout rate in one stack, so that a searched dropout rate does not split the sweep.

The dropout rate is among the most searched hyperparameters, and it is a
module's setting (``nn.Dropout(p=config["dropout"])``). Were it part of the
stack key, as a module's other settings are (:mod:`.signature`), a continuous
``tune.uniform(0.1, 0.5)`` would give every trial a stack of its own, and a
sweep would fuse nothing. So the ``p`` of the dropout modules
(``nn.Dropout`` and ``Dropout1d/2d/3d``) is per slot, like a weight:

* :class:`SlotRates` holds one rate per slot and module, set from each model
  a slot is given (:meth:`ModelBatch.load_slot` with a module), copied and
  resized with the slot. It is not in a checkpoint: a trial's config builds
  its model, and its rate, again (a PBT exploit takes the new config's rate).
* The stack's template module (the one forward that runs every slot) holds a
  :class:`SlotRate` as ``p``: a float that names its module. The fused paths
  ask :meth:`SlotRates.rows` for each row's rate where they draw dropout masks
  (``fast_path``'s dropout kernels, the vmap path's dropout in
  :mod:`.slot_random`, and SDPA's ``dropout_p=self.drop.p`` on both paths),
  and row ``j``'s mask is drawn as its model's own dropout draws it.
* Anywhere else a forward reads the rate as a number (``x * (1 - self.drop.p)``,
  ``if self.drop.p > 0``), the template could only give one slot's rate. So
  a :class:`SlotRate` does arithmetic and comparisons only while its module's
  rate is the same in every held slot, and otherwise raises one line that says
  how to keep those trials apart (``stack_by``). It never returns another
  slot's number.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .errors import FusionError

# Alpha dropouts keep one rate per stack (a setting): rare in sweeps, and their affine correction is per rate.
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def is_rate(module: nn.Module, attribute: str) -> bool:
    """Whether ``module.<attribute>`` is a per-slot dropout rate (so not part of the stack key)."""
    return attribute == "p" and isinstance(module, DROPOUTS)


def rates_of(model: nn.Module) -> dict[str, float]:
    """The dropout rate of each dropout module of ``model``, by module path."""
    return {path: float(m.p) for path, m in model.named_modules() if isinstance(m, DROPOUTS)}


class SlotRates:
    """One dropout rate per slot for each dropout module of a stack (see the module docstring)."""

    def __init__(self, models: Sequence[nn.Module], template: nn.Module, held: Callable[[], list[int]]):
        self._held = held  # the slots that hold a model now: only their rates must agree for a plain number
        self.values = {path: torch.tensor([rates_of(m)[path] for m in models], dtype=torch.float64)
                       for path in rates_of(template)}
        ref = weakref.ref(self)
        for path, m in template.named_modules():
            if path in self.values:
                m.p = SlotRate(float(m.p), path, ref)

    def set(self, i: int, model: nn.Module) -> None:
        """Slot ``i`` takes ``model``'s rates."""
        rates = rates_of(model)
        for path, v in self.values.items():
            v[i] = rates[path]

    def copy(self, src: int, dst: int) -> None:
        for v in self.values.values():
            v[dst] = v[src]

    def resize(self, keep: Sequence[int], capacity: int) -> None:
        """New slot ``j`` takes old slot ``keep[j]``'s rates; new slots take the first kept one's (or 0)."""
        for path, v in self.values.items():
            out = torch.full((capacity,), float(v[keep[0]]) if keep else 0.0, dtype=torch.float64)
            if keep:
                out[: len(keep)] = v[list(keep)]
            self.values[path] = out

    def rows(self, path: str, slots: Sequence[int]) -> list[float]:
        """The rates of ``slots`` (a forward's rows) for the module at ``path``."""
        values = self.values[path].tolist()
        return [values[s] for s in slots]

    def uniform(self, path: str) -> bool:
        """Whether every held slot has the same rate at ``path``."""
        held = self._held()
        return not held or bool((self.values[path][held] == self.values[path][held[0]]).all())


def per_row(p: Any, slots: Callable[[], Sequence[int]]) -> float | list[float]:
    """``p`` as the rows of a forward see it: a plain float, or (a :class:`SlotRate` of a stack whose slots
    differ) each row's rate; ``slots`` gives the forward's rows (their slot indices)."""
    if isinstance(p, list):  # already each row's
        return p
    if isinstance(p, SlotRate):
        rates = p._rates()
        if rates is not None:
            rows = rates.rows(p.path, slots())
            if rows and all(r == rows[0] for r in rows):
                return rows[0]
            return rows
    return float(p)


def _plain(method: str) -> Callable:
    base = getattr(float, method)

    def op(self: "SlotRate", *args: Any) -> Any:
        self._check(method)
        return base(self, *args)

    op.__name__ = method
    return op


class SlotRate(float):
    """The ``p`` of a stack's template dropout module: slot 0's rate as a float, with its module's path.

    The fused dropout kernels read each row's rate (:func:`per_row`); used as a
    number anywhere else it works only while every held slot has this rate.
    """

    path: str
    _ref: Any

    def __new__(cls, value: float, path: str, rates: Any = None) -> "SlotRate":
        obj = super().__new__(cls, value)
        obj.path, obj._ref = path, rates
        return obj

    def __reduce__(self) -> tuple:  # pickled (another process has not the stack's rates): a plain float
        return float, (float.__float__(self),)

    def __copy__(self) -> "SlotRate":  # a copy of the template keeps the tie to the stack's rates
        return self

    def __deepcopy__(self, memo: dict) -> "SlotRate":
        return self

    def _rates(self) -> SlotRates | None:
        return self._ref() if self._ref is not None else None

    def _check(self, use: str) -> None:
        rates = self._rates()
        if rates is not None and not rates.uniform(self.path):
            raise FusionError(
                f"module '{self.path}' has a different dropout rate in each slot of this stack, and the forward "
                f"reads its p as a number ({use}): the stack cannot give each slot its own. Fix: pass "
                "stack_by=['<your dropout key>'] so that trials with different rates train in different stacks, "
                "or use the module (self.drop(x)) or F.dropout(x, self.drop.p) where the forward reads p.")

    __hash__ = float.__hash__

    def __repr__(self) -> str:
        return float.__repr__(self)


for _name in ("__float__", "__int__", "__bool__", "__round__", "__trunc__", "__floor__", "__ceil__",
              "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
              "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__", "__rpow__", "__neg__", "__pos__",
              "__abs__", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "__divmod__", "__rdivmod__"):
    setattr(SlotRate, _name, _plain(_name))
