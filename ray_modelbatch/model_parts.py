"""Models made of parts, each with its own optimizer: a GAN's generator and discriminator.

A sweep of GANs trains two networks per trial, with two optimizers and two
sets of hyperparameters, updated alternately: the discriminator's update,
then the generator's loss through the *updated* discriminator. Here the
trial's model is an ``nn.ModuleDict`` (``{"G": ..., "D": ...}``) stacked as
one :class:`~ray_modelbatch.ModelBatch`, and each part gets a vectorized
optimizer over only its own parameters:

- :class:`PartView` shows an optimizer the columns of the stack's flat
  ``[S, P]`` buffers that hold one part's parameters (a ModuleDict's parts
  are contiguous there), so the optimizers of :mod:`ray_modelbatch.optim`
  work on a part unchanged, and their per-slot state is sized to the part;
- :class:`OptimizerSet` holds the parts' optimizers and answers, for the
  slot machinery, as one optimizer: hyperparameters and state by part.

The alternating step itself is :meth:`FusedEngine.train_step` with one step
function per part (``train_step={"D": d_step, "G": g_step}``), run in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from .model_batch import ModelBatch, Slots


@dataclass
class PartGroup:
    """The columns ``[start, end)`` of one dtype's flat buffers that hold a part's parameters."""

    mb: ModelBatch
    dtype: torch.dtype
    start: int
    end: int
    names: list[str]
    offsets: list[int]  # relative to ``start``
    shapes: list[tuple[int, ...]]

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def data(self) -> torch.Tensor:  # read each time: a resize replaces the flat buffers
        return self.mb.groups[self.dtype].data[:, self.start: self.end]

    @property
    def grad(self) -> torch.Tensor:
        return self.mb.groups[self.dtype].grad[:, self.start: self.end]


class PartView:
    """A ModelBatch as one part's optimizer sees it: only the part's parameter columns.

    Everything else (slots, device, attach hooks, gradient sync) is the whole
    stack's, so the optimizer follows resizes, resets and copies of slots.
    """

    def __init__(self, mb: ModelBatch, part: str):
        self.mb, self.part = mb, part
        prefix = f"{part}."
        self._groups: dict[torch.dtype, PartGroup] = {}
        for dt, g in mb.groups.items():
            rows = [(n, o, sh) for n, o, sh in zip(g.names, g.offsets, g.shapes) if n.startswith(prefix)]
            if not rows:
                continue
            start = rows[0][1]
            end = rows[-1][1] + int(torch.Size(rows[-1][2]).numel())
            inside = [n for n, o, _ in zip(g.names, g.offsets, g.shapes) if start <= o < end]
            if len(inside) != len(rows):
                raise ValueError(f"the parameters of part {part!r} are not contiguous in the stack (tensors of other "
                                 f"parts lie between them: {sorted(set(inside) - {r[0] for r in rows})[:3]}); make "
                                 "the model an nn.ModuleDict of its parts with no parameters of its own.")
            self._groups[dt] = PartGroup(mb, dt, start, end, [r[0] for r in rows], [r[1] - start for r in rows],
                                         [r[2] for r in rows])
        if not self._groups:
            names = sorted({n.split(".")[0] for g in mb.groups.values() for n in g.names})
            raise ValueError(f"the model has no trainable parameters under {part!r}; its parts are {names}. The keys "
                             "of optimizer= and train_step= must be the keys of the nn.ModuleDict model(config) returns.")

    @property
    def groups(self) -> dict[torch.dtype, PartGroup]:
        return self._groups

    @property
    def num_slots(self) -> int:
        return self.mb.num_slots

    @property
    def device(self) -> torch.device:
        return self.mb.device

    def attach(self, listener: Any) -> None:
        self.mb.attach(listener)

    def sync_grads(self) -> None:
        self.mb.sync_grads()

    @property
    def gradless(self) -> tuple[str, ...]:
        return self.mb.gradless

    def zero_grad(self) -> None:
        self.mb.zero_grad()

    def resolve_slots(self, slots: Slots) -> torch.Tensor | None:
        return self.mb.resolve_slots(slots)

    def _cpu_index(self, slots: Slots) -> torch.Tensor:
        return self.mb._cpu_index(slots)

    def _check_slot(self, i: int) -> int:
        return self.mb._check_slot(i)


class OptimizerSet:
    """One optimizer per part, seen by the slot machinery as one optimizer.

    Hyperparameters are given per part (``set_hparams(slot, G={"lr": ...},
    D={"lr": ...})``), per-slot state is prefixed by the part's name, and the
    learning rate and step count reported for a slot are the first part's.
    """

    def __init__(self, mb: ModelBatch, factories: Mapping[str, Callable[[Any], Any]]):
        self.mb = mb
        self.parts = {name: factory(PartView(mb, name)) for name, factory in factories.items()}
        first = next(iter(self.parts.values()))
        self.last_nonfinite = torch.zeros_like(first.last_nonfinite)
        self.last_grad_norm = torch.zeros_like(first.last_grad_norm)

    @property
    def steps(self) -> torch.Tensor:
        return next(iter(self.parts.values())).steps

    def current_lr(self) -> torch.Tensor:
        return next(iter(self.parts.values())).current_lr()

    def zero_grad(self, set_to_none: bool = False) -> None:
        self.mb.zero_grad()

    def _split(self, hparams: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
        unknown = sorted(set(hparams) - set(self.parts))
        if unknown:
            raise ValueError(f"hyperparameters for parts {unknown}, but the optimizers are for parts "
                             f"{sorted(self.parts)}: hparams(config) must return {{part: {{'lr': ...}}}}.")
        return {name: dict(hparams.get(name) or {}) for name in self.parts}

    def set_hparams(self, slots: Slots, **hparams: Any) -> None:
        for name, values in self._split(hparams).items():
            if values:
                self.parts[name].set_hparams(slots, **values)

    def get_hparams(self, i: int) -> dict[str, Any]:
        return {name: opt.get_hparams(i) for name, opt in self.parts.items()}

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v for name, opt in self.parts.items() for k, v in opt.slot_tensors().items()}

    def slot_state(self, i: int) -> dict[str, Any]:
        return {"parts": {name: opt.slot_state(i) for name, opt in self.parts.items()}}

    def load_slot_state(self, i: int, state: Mapping[str, Any], hparams: bool = True) -> None:
        saved = state.get("parts")
        if saved is None or set(saved) != set(self.parts):
            raise ValueError(f"the optimizer state does not fit: saved for parts {sorted(saved or [])}, this model's "
                             f"optimizers are for {sorted(self.parts)}. Load a checkpoint of the same model.")
        for name, opt in self.parts.items():
            opt.load_slot_state(i, saved[name], hparams=hparams)

    def plateau_step(self, slots: Any, values: Any) -> None:
        for opt in self.parts.values():
            if hasattr(opt, "plateau_step"):
                opt.plateau_step(slots, values)

    def layout(self) -> dict[str, dict[str, list]]:
        """Where each parameter's state lies in each part's flat buffers (see ``checkpoint.per_parameter``)."""
        return {name: {str(dt): [[n, o, list(sh)] for n, o, sh in zip(g.names, g.offsets, g.shapes)]
                       for dt, g in opt.mb.groups.items()} for name, opt in self.parts.items()}
