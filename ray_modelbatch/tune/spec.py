"""What a batched trainable trains: the user's factories, kept opaque to the proxy.

The spec is cloudpickled in the driver and unpickled only inside slot hosts.
Trial proxies carry the bytes without looking inside, so user code that
imports torch is never imported into a proxy process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence


@dataclass
class SlotSpec:
    """Everything a host needs to build, train and evaluate a trial's slot.

    Attributes:
        model: ``config -> nn.Module``; called under the trial's seed.
        optimizer: a :mod:`ray_modelbatch.optim` class (e.g. ``AdamW``), or
            ``config -> class`` (trials of different classes train in different stacks).
        hparams: ``config -> dict`` of optimizer keywords for this trial
            (``lr``, ``betas``, ``weight_decay``, ``schedule``, ``max_grad_norm``...).
        loss: ``loss(output, target) -> scalar`` for one model (None with ``train_step``).
        data: ``() -> (x_train, y_train, x_val, y_val)`` tensors (the ``x`` may be dicts of
            keyword inputs), two dicts of columns, or datasets; loaded once per sweep (see tune.shared_data).
        metrics: ``{name: fn(output, target)}`` reported as ``val_<name>``.
        batch_size: training batch size, or ``config -> int`` (one per stack, since a
            fused step has one batch shape: trials of other sizes train in other stacks).
        train_step: ``(model, batch, config) -> loss or {"loss": ..., name: value}``
            written for one model, instead of ``loss``.
        eval_step: ``(model, batch, config) -> {name: value}`` for one model,
            reported under the user's own names, instead of ``metrics``.
        stack_by: float config keys a step uses in Python control flow: equal
            within a stack instead of per-slot tensors (see ``step_config``).
        plateau_metric: the result key a ``plateau=`` (ReduceLROnPlateau) rule
            steps on, once per report (default ``val_loss``).
        steps_per_report: fused steps behind each ``Trainable.step()``, or ``"epoch"``:
            one pass over the training set at the stack's batch size.
        host_memory: keep the training tensors in host memory and copy each
            step's batches to the device (data larger than device memory).
        data_workers: threads reading and transforming dataset examples.
        slots_per_host: slots of one host (all its stacks together), or ``"auto"``: each
            host profiles the model on its device and takes what fits.
        data_mode: ``"per_slot"`` (each trial its own seeded sampler, reproduces
            independent training) or ``"shared"`` (one batch for all, cheaper; which batches a
            trial sees depends on timing: see ``batched_trainable``).
        seed_key: config key holding the trial's seed; absent means a seed
            derived from the trial ID.
        cpu_gemm: the stacks' ``ModelBatch(cpu_gemm=...)``.
    """

    model: Callable[[Mapping[str, Any]], Any]
    optimizer: Any
    hparams: Callable[[Mapping[str, Any]], dict]
    loss: Callable[[Any, Any], Any] | None
    data: Callable[[], tuple]
    metrics: dict[str, Callable[[Any, Any], Any]] = field(default_factory=dict)
    batch_size: int | Callable[[Mapping[str, Any]], int] = 64
    steps_per_report: int | str = 10
    slots_per_host: int | str = 32
    data_mode: str = "per_slot"
    eval_batch_size: int | None = None
    seed_key: str = "seed"
    autocast_dtype: Any = None
    device: str | None = None
    cpu_gemm: str = "blas"
    train_step: Callable[[Any, Any, Mapping[str, Any]], Any] | None = None
    eval_step: Callable[[Any, Any, Mapping[str, Any]], Any] | None = None
    stack_by: Sequence[str] = ()
    plateau_metric: str | None = None
    host_memory: bool = False
    data_workers: int = 0

    def __post_init__(self) -> None:
        if self.data_mode not in ("per_slot", "shared"):
            raise ValueError(f"data_mode must be 'per_slot' or 'shared', got {self.data_mode!r}")
        if self.cpu_gemm not in ("blas", "onednn"):  # fast_path.GEMMS; not imported: proxies never import torch
            raise ValueError(f"cpu_gemm must be 'blas' or 'onednn', got {self.cpu_gemm!r}")
        if self.slots_per_host != "auto" and (isinstance(self.slots_per_host, str) or int(self.slots_per_host) < 1):
            raise ValueError(f"slots_per_host must be >= 1 or 'auto', got {self.slots_per_host!r}")
        names = ("steps_per_report",) if callable(self.batch_size) else ("batch_size", "steps_per_report")
        if self.steps_per_report == "epoch":
            names = tuple(n for n in names if n != "steps_per_report")
        elif isinstance(self.steps_per_report, str):
            raise ValueError(f"steps_per_report must be a positive int or 'epoch', got {self.steps_per_report!r}")
        for name in names:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.loss is None and self.train_step is None:
            raise TypeError("give loss=fn(output, target) or train_step=fn(model, batch, config): the trainable "
                            "needs one of them to train")
        if self.loss is not None and self.train_step is not None:
            raise TypeError("give either loss= or train_step=, not both: a train_step computes its own loss")
        if self.metrics and self.eval_step is not None:
            raise TypeError("give either metrics= or eval_step=, not both: an eval_step reports its own metrics")
        for name in ("model", "hparams", "data"):
            if not callable(getattr(self, name)):
                raise TypeError(f"{name} must be callable, got {type(getattr(self, name)).__name__}")
        if _is_module(self.model, instance=True):
            raise TypeError(f"model= is a {type(self.model).__name__} model; it must be a function that builds one "
                            "model from the trial's config, since each trial needs its own. Fix: model=lambda "
                            f"config: {type(self.model).__name__}(...)")
        if _is_module(self.loss, instance=False):
            raise TypeError(f"loss={self.loss.__name__} is the class; pass a loss: loss={self.loss.__name__}() "
                            "(or the function, e.g. torch.nn.functional.cross_entropy)")
        _check_arguments("model", self.model, 1, "model=lambda config: MyNet(config['hidden'])")
        _check_arguments("hparams", self.hparams, 1, "hparams=lambda config: {'lr': config['lr']}")
        _check_arguments("data", self.data, 0, "data=load_my_data, a function of no arguments")
        if callable(self.batch_size):
            _check_arguments("batch_size", self.batch_size, 1, "batch_size=lambda config: config['batch_size']")
        for name in ("loss", "train_step", "eval_step"):
            value = getattr(self, name)
            if isinstance(value, Mapping) and name == "train_step":
                if not value or not all(callable(f) for f in value.values()):
                    raise TypeError("train_step as a dict must map each part of the model to a step function")
                continue
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable, got {type(getattr(self, name)).__name__}")
        if isinstance(self.stack_by, str):
            self.stack_by = (self.stack_by,)
        if isinstance(self.optimizer, Mapping):  # one per part of the model (see model_parts)
            for part in self.optimizer.values():
                check_optimizer(part)
            if self.train_step is not None and (not isinstance(self.train_step, Mapping)
                                                or list(self.train_step) != list(self.optimizer)):
                raise TypeError(f"optimizer has parts {list(self.optimizer)}: give train_step as a dict of one step "
                                "per part, in the order they update (e.g. {'D': d_step, 'G': g_step}).")
        else:
            if isinstance(self.train_step, Mapping):
                raise TypeError(f"train_step has one step per part {list(self.train_step)}: give optimizer as a dict "
                                "of one optimizer class per part, in the same order.")
            check_optimizer(self.optimizer)


def _is_module(value: Any, *, instance: bool) -> bool:
    """Whether ``value`` is a ``torch.nn.Module`` (instance) or a subclass of it (class), without importing torch."""
    cls = type(value) if instance else value
    return isinstance(cls, type) and (not instance or not isinstance(value, type)) and any(
        c.__name__ == "Module" and c.__module__ == "torch.nn.modules.module" for c in cls.__mro__)


def _check_arguments(name: str, fn: Callable, count: int, example: str) -> None:
    """One line for a function that cannot be called as the host calls it (``count`` positional arguments)."""
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C function without a signature: let the call tell
        return
    try:
        signature.bind(*range(count))
    except TypeError:
        takes = "the trial's config" if count == 1 else "no arguments"
        raise TypeError(f"{name}={getattr(fn, '__name__', fn)!s} takes {signature}, but the slot host calls it with "
                        f"{takes}. Fix: {example}.") from None


# ray_modelbatch.optim's classes (not imported here: no torch)
FUSED_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")


def check_optimizer(optimizer: Any) -> None:
    """One clear line when ``optimizer`` is not a ``ray_modelbatch.optim`` class (or a factory of one).

    A ``torch.optim`` class would otherwise fail deep inside torch, once per
    trial, with ``'ModelBatch' object is not iterable``. Checked by the class's
    module name, so the driver and proxies still never import torch here.
    """
    mro = getattr(optimizer, "__mro__", None)
    if mro is None and not callable(optimizer):
        raise TypeError(f"optimizer must be a ray_modelbatch.optim class ({', '.join(FUSED_OPTIMIZERS)}) or a "
                        f"function of the trial's config returning one; got {optimizer!r}.")
    if mro is None:  # functools.partial of a class, or config -> class: checked when a host resolves it
        base = getattr(optimizer, "func", None)
        if base is None:
            return
        return check_optimizer(base)
    names = [f"{c.__module__}.{c.__qualname__}" for c in mro]
    if any(n.startswith("ray_modelbatch.optim.") for n in names):
        return
    if any(n.startswith("torch.optim.") for n in names):
        fused = optimizer.__name__ if optimizer.__name__ in FUSED_OPTIMIZERS else None
        fix = (f"use ray_modelbatch.optim.{fused}, which takes the same keywords, one value per slot"
               if fused else f"ray_modelbatch.optim has {', '.join(FUSED_OPTIMIZERS)}")
        raise TypeError(f"optimizer={optimizer.__module__}.{optimizer.__name__} is a torch.optim class, which "
                        f"cannot step a stack of models: {fix}.")
    raise TypeError(f"optimizer must be a ray_modelbatch.optim class ({', '.join(FUSED_OPTIMIZERS)}) or a "
                    f"function of the trial's config returning one; got {optimizer!r}.")
