"""torch habits a fused optimizer refuses in one line, naming what to write instead.

``torch.optim.lr_scheduler`` objects cannot drive a fused optimizer exactly:
a scheduler holds one step counter and one set of values for all the
parameter groups it moves, while here each slot's schedule is a function of
the slot's own step count (kept through resets, PBT copies and checkpoints,
and skipped with the slot on a non-finite step), and every schedule value may
differ per slot. So they are refused, naming the per-slot equivalent in
:mod:`ray_modelbatch.optim.schedules`.

torch would refuse them too, but as ``TypeError: Adam is not an Optimizer``
(its ``isinstance`` check), which reads as a bug. The hook is where torch
looks: ``isinstance`` falls back to the object's ``__class__`` when the type
does not match, and ``LambdaLR`` reads ``param_groups`` first. Both hooks of
:class:`~ray_modelbatch.optim.VectorOptimizer` call :func:`refuse_scheduler`,
which acts only when its caller is code of ``torch.optim.lr_scheduler``.
"""

from __future__ import annotations

import types
from typing import Any

from ..errors import HyperparameterError

SCHEDULER_MODULE = "torch.optim.lr_scheduler"

# torch's scheduler -> what to give the fused optimizer instead.
EQUIVALENTS: dict[str, str] = {
    "StepLR": "schedule=schedules.step_decay(step_size, gamma)",
    "MultiStepLR": "schedule=schedules.multi_step(milestones, gamma)",
    "ExponentialLR": "schedule=schedules.exponential(gamma)",
    "CosineAnnealingLR": "schedule=schedules.warmup_cosine(total_steps=T_max, min_lr_ratio=eta_min / lr)",
    "OneCycleLR": "schedule=schedules.one_cycle(total_steps, pct_start, ...) with lr=max_lr",
    "LinearLR": "schedule=schedules.linear(start_factor, end_factor, total_iters)",
    "ReduceLROnPlateau": ("plateau=schedules.plateau(mode, factor, patience, ...) with opt.plateau_step(slots, "
                          "metrics) once per epoch"),
    "LambdaLR": ("schedule=schedules.warmup_linear(warmup_steps, total_steps) for transformers' "
                 "get_linear_schedule_with_warmup, or schedules.warmup_cosine(total_steps, warmup_steps) for "
                 "get_cosine_schedule_with_warmup (an arbitrary lambda has no per-slot form)"),
}
BUILT_INS = ("constant, step_decay, multi_step, exponential, warmup_cosine, one_cycle, linear, warmup_linear "
             "and plateau")


class TorchSchedulerError(HyperparameterError, TypeError):
    """A ``torch.optim.lr_scheduler`` object was given a fused optimizer (a TypeError, as torch's own refusal)."""


class NoParamGroupsError(HyperparameterError, AttributeError):
    """``opt.param_groups`` was read: an AttributeError, so ``getattr(opt, "param_groups", None)`` stays quiet."""


def _torch_name(scheduler: Any) -> str:
    """The name of torch's scheduler class that ``scheduler`` is (or derives from)."""
    for cls in type(scheduler).__mro__:
        if cls.__module__ == SCHEDULER_MODULE:
            return cls.__name__
    return "lr scheduler"


def scheduler_refusal(scheduler: Any, optimizer: Any) -> str:
    """The one-line refusal for ``scheduler`` driving ``optimizer``."""
    name = _torch_name(scheduler)
    opt = type(optimizer).__name__
    fix = EQUIVALENTS.get(name)
    instead = (f"give {opt} {fix} instead, from ray_modelbatch.optim.schedules (values may differ per slot)"
               if fix else f"it has no per-slot equivalent; the schedules of ray_modelbatch.optim.schedules are "
                           f"{BUILT_INS}, given as {opt}(schedule=...)")
    return (f"torch.optim.lr_scheduler.{name} cannot drive the fused {opt} (a scheduler holds one state for all "
            f"slots, while each slot's schedule follows its own steps and metrics through resets, PBT copies and "
            f"checkpoints): {instead}.")


def refuse_scheduler(frame: types.FrameType | None, optimizer: Any) -> None:
    """Raise :class:`TorchSchedulerError` if ``frame`` (the caller of a hook) is a torch lr scheduler's code."""
    if frame is None or frame.f_globals.get("__name__") != SCHEDULER_MODULE:
        return
    raise TorchSchedulerError(scheduler_refusal(frame.f_locals.get("self"), optimizer))


def param_groups_refusal(optimizer: Any) -> str:
    opt = type(optimizer).__name__
    return (f"the fused {opt} has no torch param_groups: its hyperparameters are per slot. Read them with "
            f"get_hparams(slot) or current_lr(), change them with set_hparams(slots, lr=...); parameter groups "
            f"are {opt}(param_groups=[...]) and schedules {opt}(schedule=...).")
