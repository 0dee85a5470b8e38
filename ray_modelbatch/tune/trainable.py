"""``batched_trainable``: the one call that turns model and optimizer factories into a Tune trainable."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Mapping

import cloudpickle
import ray
from ray.tune.search import ConcurrencyLimiter, Searcher

from .proxy import SlotTrialProxy
from .registry import get_registry, plan_hosts, registry_name
from .spec import SlotSpec


def batched_trainable(
    *,
    model: Callable[[Mapping[str, Any]], Any],
    optimizer: Any,
    hparams: Callable[[Mapping[str, Any]], dict],
    loss: Callable[[Any, Any], Any],
    data: Callable[[], tuple],
    metrics: Mapping[str, Callable] | None = None,
    batch_size: int = 64,
    steps_per_report: int = 10,
    slots_per_host: int = 32,
    data_mode: str = "per_slot",
    eval_batch_size: int | None = None,
    seed_key: str = "seed",
    autocast_dtype: Any = None,
    device: str | None = None,
    num_hosts: int | None = None,
    host_cpus: float = 1,
    trial_resources: dict | None = None,
    idle_timeout_s: float = 60.0,
    stats_every_s: float = 5.0,
    lease_check_s: float = 2.0,
    name: str = "BatchedTrainable",
) -> type[SlotTrialProxy]:
    """Build a Tune trainable whose trials are slots of fused stacks on shared hosts.

    Use the result with ``tune.Tuner(trainable, param_space=..., tune_config=...)``
    or ``tune.run(trainable, config=...)`` as it is; schedulers, searchers,
    ``RunConfig`` and the ``ResultGrid`` stay Tune's.

    Args:
        model: ``config -> nn.Module``, built under the trial's seed (``config[seed_key]``
            or a seed derived from the trial ID). Configs that give different
            shapes or module settings land in different stacks.
        optimizer: a :mod:`ray_modelbatch.optim` class, e.g. ``ray_modelbatch.optim.AdamW``.
        hparams: ``config -> dict`` of that optimizer's keywords for the trial
            (``lr``, ``betas``, ``weight_decay``, ``schedule``, ``max_grad_norm``...).
        loss: ``loss(output, target) -> scalar`` written for one model.
        data: ``() -> (x_train, y_train, x_val, y_val)``; called once per host, so
            load or build the data inside it (nothing is downloaded by us).
        metrics: ``{name: fn(output, target)}``, reported as ``val_<name>`` with ``val_loss``.
        batch_size: training batch size of every trial.
        steps_per_report: fused steps per ``Trainable.step()`` (one Tune iteration).
        slots_per_host: trials one host trains at once (over all its stacks).
        data_mode: ``"per_slot"`` (own seeded sampler per trial) or ``"shared"``.
        num_hosts: fixed number of hosts; default one per GPU, or one per node without GPUs.
        host_cpus: CPUs each host reserves (it does the compute).
        trial_resources: resources of each proxy trial (default ``{"CPU": 0.01}``).
        idle_timeout_s: hosts stop this long after their last trial left.
        stats_every_s: how often each host writes its own TensorBoard figures
            (under ``<experiment dir>/slot_hosts/<host>``).
        lease_check_s: how often a host looks for trials whose process died
            without detaching, and frees their slots.
    """
    spec = SlotSpec(
        model=model, optimizer=optimizer, hparams=hparams, loss=loss, data=data, metrics=dict(metrics or {}),
        batch_size=batch_size, steps_per_report=steps_per_report, slots_per_host=slots_per_host,
        data_mode=data_mode, eval_batch_size=eval_batch_size, seed_key=seed_key,
        autocast_dtype=autocast_dtype, device=device,
    )
    options = {
        "steps_per_report": int(steps_per_report),
        "slots_per_host": int(slots_per_host),
        "num_hosts": num_hosts,
        "host_cpus": host_cpus,
        "trial_resources": trial_resources,
        "idle_timeout_s": float(idle_timeout_s),
        "stats_every_s": float(stats_every_s),
        "lease_check_s": float(lease_check_s),
    }
    attrs = {
        "_spec_bytes": cloudpickle.dumps(spec),
        "_experiment": uuid.uuid4().hex[:12],
        "_options": options,
        "max_concurrent": classmethod(_max_concurrent),
        "host_stats": classmethod(_host_stats),
        "shutdown_hosts": classmethod(_shutdown_hosts),
    }
    return type(name, (SlotTrialProxy,), attrs)


def _max_concurrent(cls: type[SlotTrialProxy]) -> int:
    """Slots this trainable has on the current Ray cluster: use as ``max_concurrent_trials``."""
    return len(plan_hosts(cls._options.get("num_hosts"))) * int(cls._options["slots_per_host"])


def _host_stats(cls: type[SlotTrialProxy]) -> list[dict]:
    """Per-host figures (busy fraction, fused steps, free slots) of this trainable's running hosts."""
    try:
        registry = ray.get_actor(registry_name(cls._experiment))
    except ValueError:
        return []
    return ray.get(registry.stats.remote())


def _shutdown_hosts(cls: type[SlotTrialProxy]) -> None:
    """Stop this trainable's registry and hosts now instead of waiting for the idle timeout."""
    try:
        registry = ray.get_actor(registry_name(cls._experiment))
    except ValueError:
        return
    try:
        ray.get(registry.shutdown.remote())
    except ray.exceptions.RayActorError:
        pass  # it kills itself while answering


class FreeSlotLimiter(ConcurrencyLimiter):
    """Caps a searcher's live trials at the trainable's slot capacity, so Tune never oversubscribes.

    ``tune.TuneConfig(search_alg=FreeSlotLimiter(OptunaSearch(...), trainable))``.
    For random and grid search, ``TuneConfig(max_concurrent_trials=trainable.max_concurrent())``
    does the same; when you pass your own ``BasicVariantGenerator`` instance, Tune ignores
    ``max_concurrent_trials``, so give it ``max_concurrent=trainable.max_concurrent()`` instead.
    """

    def __init__(self, searcher: Searcher, trainable: type[SlotTrialProxy], batch: bool = False):
        super().__init__(searcher, max_concurrent=trainable.max_concurrent(), batch=batch)


__all__ = ["batched_trainable", "FreeSlotLimiter", "get_registry"]
