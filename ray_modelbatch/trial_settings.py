"""Settings a trial's config may choose besides its model: the optimizer family and the batch size.

A fused step runs one optimizer update and one batch shape for a whole
stack, so trials that choose another optimizer class or another batch size
train in another stack (of the same host). Grouping them is cheaper than
masking: padding every slot's batch to the largest one computes
``max / mean`` times the rows and changes what BatchNorm sees, while another
stack costs one more fused step per distinct choice.

Both settings are given to the trainable either as a value or as a function
of the trial's config, which is how a Tune search space reaches them.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping

from .errors import TrialConfigError


def _is_optimizer_class(obj: Any) -> bool:
    from .optim.base import VectorOptimizer

    return inspect.isclass(obj) and issubclass(obj, VectorOptimizer)


def _is_fixed(optimizer: Any) -> bool:
    """A class, or a ``functools.partial`` of one (a class with some keywords fixed)."""
    if _is_optimizer_class(optimizer):
        return True
    return isinstance(optimizer, functools.partial) and _is_optimizer_class(optimizer.func)


def resolve_optimizer(optimizer: Any, config: Mapping[str, Any] | None) -> Any:
    """The optimizer factory (``ModelBatch -> optimizer``) of a trial, or one per part of its model.

    ``optimizer`` is a :mod:`ray_modelbatch.optim` class (or a ``functools.partial``
    of one), a function ``config -> class`` that chooses it per trial, or a dict
    of those by part (``{"G": optim.Adam, "D": optim.Adam}``; see
    :mod:`ray_modelbatch.model_parts`).
    """
    if isinstance(optimizer, Mapping):
        return {part: resolve_optimizer(o, config) for part, o in optimizer.items()}
    if _is_fixed(optimizer):
        return optimizer
    if config is None:  # no trial (the standalone Trainer, a profile): a plain factory of a ModelBatch
        return optimizer
    try:
        chosen = optimizer(config)
    except (AttributeError, TypeError) as exc:  # e.g. a ModelBatch -> optimizer lambda given a config
        raise TrialConfigError(
            f"optimizer={getattr(optimizer, '__name__', optimizer)!r} failed on this trial's config "
            f"({type(exc).__name__}: {exc}); give a ray_modelbatch.optim class, functools.partial(class, ...) for "
            "fixed keywords, or a function config -> class."
        ) from exc
    if not _is_fixed(chosen):
        raise TrialConfigError(
            f"optimizer={getattr(optimizer, '__name__', optimizer)!r} returned {chosen!r} for this trial's config; "
            "a function given as optimizer= must return a ray_modelbatch.optim class (e.g. optim.Adam, or "
            "functools.partial(optim.SGD, momentum=0.9))."
        )
    return chosen


def build_optimizer(factory: Any, mb: Any) -> Any:
    """The stack's optimizer from :func:`resolve_optimizer`'s result: one, or an ``OptimizerSet`` of parts."""
    if isinstance(factory, Mapping):
        from .model_parts import OptimizerSet

        return OptimizerSet(mb, factory)
    return factory(mb)


def fits_param_groups(opt: Any, hparams: Mapping[str, Any] | None) -> bool:
    """Whether a trial's hparams give the parameter groups that ``opt``, its stack's optimizer, has.

    Group membership shapes the fused update (see :mod:`ray_modelbatch.optim.groups`),
    so it is equal within a stack, like the optimizer family: a trial whose
    ``param_groups`` hold other parameters trains in another stack. Group
    values may differ per trial. A model in parts is checked part by part.
    """
    hparams = hparams or {}
    parts = getattr(opt, "parts", None)
    if parts is not None:
        return all(fits_param_groups(o, hparams.get(name)) for name, o in parts.items())
    fits = getattr(opt, "fits_param_groups", None)
    return fits is None or fits(hparams.get("param_groups"))


def optimizer_id(factory: Any) -> str:
    """A name equal exactly when two trials' optimizer factories build the same optimizer family."""
    if isinstance(factory, Mapping):
        return repr({part: optimizer_id(f) for part, f in factory.items()})
    if isinstance(factory, functools.partial):
        fixed = sorted((k, repr(v)) for k, v in factory.keywords.items())
        return f"{optimizer_id(factory.func)}{fixed}"
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"


def resolve_batch_size(batch_size: int | Callable[[Mapping[str, Any]], int], config: Mapping[str, Any] | None) -> int:
    """A trial's training batch size: ``batch_size`` itself, or ``batch_size(config)``."""
    value = batch_size(config or {}) if callable(batch_size) else batch_size
    if isinstance(value, bool) or not isinstance(value, int) and not (hasattr(value, "__index__")):
        raise TrialConfigError(f"batch_size must be a positive int (or a function of the config returning one); "
                               f"got {value!r} for this trial.")
    value = int(value)
    if value < 1:
        raise TrialConfigError(f"batch_size must be >= 1; got {value} for this trial. Fix the search space.")
    return value


# Config keys that look like training settings: a trial whose config has one that nothing reads
# is almost always a port that forgot to wire it (the search would vary nothing).
SETTING_NAMES = frozenset({
    "batch_size", "lr", "learning_rate", "momentum", "weight_decay", "wd", "optimizer", "optim", "betas",
    "beta1", "beta2", "eps", "epochs", "num_epochs", "max_epochs", "steps", "schedule", "scheduler", "gamma",
    "warmup_steps", "max_grad_norm", "grad_clip", "clip", "dropout", "l2",
})


def unread_settings(config: Mapping[str, Any], reads: set) -> list[str]:
    """Top-level keys of ``config`` named like a training setting that no factory or step read."""
    read = {path[0] for path in reads if path}
    return sorted(k for k in config if k in SETTING_NAMES and k not in read)
