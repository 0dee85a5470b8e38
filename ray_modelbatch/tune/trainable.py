"""``batched_trainable``: the one call that turns model and optimizer factories into a Tune trainable."""

from __future__ import annotations

import uuid
from typing import Any, Callable, Mapping, Sequence

import ray
from ray import cloudpickle  # Ray's vendored copy, the pickler Ray itself ships the trainable with
from ray.tune.search import ConcurrencyLimiter, Searcher

from .cpu_spread import check_cpu_hosts_per_node
from .proxy import SlotTrialProxy
from .registry import NAMESPACE, check_hosts_per_gpu, get_registry, planned_hosts, registry_exists, registry_name
from .shared_data import load_in_driver
from .spec import SlotSpec


def batched_trainable(
    *,
    model: Callable[[Mapping[str, Any]], Any],
    optimizer: Any,
    hparams: Callable[[Mapping[str, Any]], dict],
    data: Callable[[], tuple],
    loss: Callable[[Any, Any], Any] | None = None,
    metrics: Mapping[str, Callable] | None = None,
    train_step: Callable[[Any, Any, Mapping[str, Any]], Any] | None = None,
    eval_step: Callable[[Any, Any, Mapping[str, Any]], Any] | None = None,
    stack_by: Sequence[str] = (),
    plateau_metric: str | None = None,
    host_memory: bool = False,
    data_in_driver: bool = True,
    data_workers: int = 0,
    batch_size: int | Callable[[Mapping[str, Any]], int] = 64,
    steps_per_report: int | str = 10,
    slots_per_host: int | str = 32,
    profile_config: Mapping[str, Any] | None = None,
    max_slots_per_host: int = 256,
    data_mode: str = "per_slot",
    eval_batch_size: int | None = None,
    seed_key: str = "seed",
    autocast_dtype: Any = None,
    device: str | None = None,
    cpu_gemm: str = "blas",
    num_hosts: int | None = None,
    cpu_hosts_per_node: int | str = "auto",
    hosts_per_gpu: int = 1,
    host_cpus: float = 1,
    host_threads: int | None = None,
    run_ahead: int = 2,
    move_slots: bool = True,
    trial_resources: dict | None = None,
    idle_timeout_s: float = 20.0,
    stats_every_s: float = 5.0,
    lease_check_s: float = 2.0,
    host_start_timeout_s: float = 120.0,
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
        optimizer: a :mod:`ray_modelbatch.optim` class, e.g. ``ray_modelbatch.optim.AdamW``
            (or ``functools.partial`` of one), or ``config -> class`` to search the optimizer
            family: trials of different classes train in different stacks.
        hparams: ``config -> dict`` of that optimizer's keywords for the trial
            (``lr``, ``betas``, ``weight_decay``, ``schedule``, ``max_grad_norm``...).
        data: ``() -> (x_train, y_train, x_val, y_val)`` tensors, or map-style torch
            ``Dataset``s: ``(train_dataset, val_dataset)`` or ``{"train": ..., "val": ...,
            "transform": fn}``. The training set is then read per slot with its own seeded
            shuffle, and ``transform(sample, generator)`` (or a torchvision-style
            ``transform(x)``) augments each example reproducibly per trial; the validation
            set is collated once. Batches may be dicts, as Hugging Face batches are: return
            ``(train, val)`` as two dicts of columns (``{"input_ids": ..., "attention_mask": ...,
            "labels": ...}``, one row per example), or dicts as ``x_train``/``x_val``, or a
            ``Dataset`` of dict examples; the steps then get each batch as a dict (see
            docs/porting.md). Load or build the data inside it (nothing is downloaded by us).
            It is called once in the driver while the hosts start, and every host takes its
            result from Ray's object store (see ``data_in_driver``).
        loss: ``loss(output, target) -> scalar`` written for one model: the simple path.
        metrics: ``{name: fn(output, target)}``, reported as ``val_<name>`` with ``val_loss``.
        train_step: instead of ``loss``, the training step as written for one model:
            ``train_step(model, (x, y), config)`` (or ``train_step(model, batch, config)`` for dict
            batches that hold their labels: ``model(**batch).loss``) returns the loss, or a dict whose ``"loss"``
            is backpropagated and whose other entries are reported under their own names.
            It may call the model several times, penalize its weights, draw noise. Float
            values it reads from ``config`` are per-trial tensors inside the fused step;
            other values it reads (ints, strings...) are equal within a stack.
        eval_step: instead of ``metrics``, ``eval_step(model, (x, y), config) -> {name: value}``
            for one model on validation batches, reported under the user's own names
            (unprefixed). With ``train_step`` and no ``eval_step``, the training step's values
            on the validation data are reported as ``val_loss`` and ``val_<name>``.
        stack_by: config keys whose values must be equal within a stack: float keys the steps use
            in Python control flow (``if``, ``range``), kept as Python values; or a dropout rate the
            model's forward also reads as a number (each slot otherwise keeps its own rate).
        plateau_metric: the result key that ``hparams``' ``plateau=schedules.plateau(...)``
            (ReduceLROnPlateau) steps on after each report; default ``val_loss``.
        batch_size: training batch size of every trial, or ``config -> int`` to search it:
            trials of different sizes train in different stacks.
        steps_per_report: fused steps per ``Trainable.step()`` (one Tune iteration), or
            ``"epoch"``: one pass over the training set at the trial's batch size.
        data_in_driver: call ``data()`` once in the driver, in a thread, while the slot hosts
            start (they would otherwise each call it after their torch import, on the critical
            path to the first result), and hand its result to every host. Only CPU tensors and
            arrays in tuples, lists and dicts, up to 1 GiB, travel this way; anything else (or a
            ``data()`` that fails in the driver) is loaded by each host itself, as with False:
            use False when ``data()`` must run on the host's node (node-local files, a GPU).
        host_memory: keep training tensors in host memory and copy each step's batches to
            the device, for data larger than device memory.
        data_workers: threads that read and transform dataset examples (for I/O-bound
            datasets; on CPU-bound transforms they do not help).
        slots_per_host: trials one host trains at once (over all its stacks), or ``"auto"``:
            each host builds the model of ``profile_config`` at two slot counts, measures the
            peak memory of a step, fits a line and takes the slots that fit in 80% of its free
            device memory (up to ``max_slots_per_host``), then times a step at 8, 32, 128 and 512
            slots up to that and keeps the largest count within 90% of the best model-steps/s
            (on a CPU a stack of conv nets slows down per slot past ~32); a step that still runs
            out of memory is split into smaller fused steps.
        profile_config: with ``"auto"``, the config to profile: the largest model of the
            sweep. Default: the config of the trial that starts the host.
        max_slots_per_host: the most slots ``"auto"`` gives one host (each slot's model,
            optimizer state and activations live on its host).
        data_mode: ``"per_slot"`` (each trial its own sampler, seeded from its config: it sees the
            batches it would alone, and every result is reproducible and exact under run-ahead) or
            ``"shared"``: every slot of a stack trains on the same batch at each fused step, drawn from
            one stream per stack (one input for all slots, cheaper). Which batches a trial then sees
            depends on when it joins and on the other trials' steps, so its results differ from run to
            run and with ``run_ahead``; use it where data order does not matter.
        eval_batch_size: batch size of validation passes (default: the whole validation set).
        seed_key: config key holding the trial's seed.
        autocast_dtype: ``torch.bfloat16`` or ``torch.float16`` to train under autocast
            (fp16 with per-slot loss scaling); None trains in the model's dtype.
        device: the hosts' device, e.g. ``"cpu"``; default ``cuda`` where the host has a GPU.
        cpu_gemm: ``ModelBatch(cpu_gemm=...)``: ``"onednn"`` runs large fp32 Linear layers
            on CPU hosts through oneDNN (faster where the BLAS lacks AVX-512, not bitwise
            ``nn.Linear``'s results); default ``"blas"``.
        num_hosts: fixed number of hosts, unpinned and without a GPU (they train on the CPU of
            whichever node Ray puts them on, also on a GPU cluster); default ``hosts_per_gpu`` per
            GPU, or ``cpu_hosts_per_node`` per node without GPUs.
        cpu_hosts_per_node: hosts on each node without GPUs. Each steps its own stacks in a
            process of its own with its share of the node's cores, and the trials spread over
            them: that pays for models whose fused step is mostly kernel time (on a 2-core
            node the digits CNN sweep took a median 26.1 s with 2 against 33.2 s with 1),
            not for tiny MLPs, whose steps are mostly Python (8.3 s
            with 1 against 9.8-10.2 s with 2). ``"auto"`` (default): one, and a second one
            once the first finds its fused steps kernel-bound (see ``tune.cpu_spread``).
        hosts_per_gpu: slot hosts on each GPU, each a process of its own reserving its part of
            the GPU (``1 / hosts_per_gpu``) and planning for its part of the GPU's memory. A
            fused step of small models is mostly the host's Python issuing kernels (an H200
            stayed 6-8% busy under one host), and several hosts issue kernels side by side.
        host_cpus: CPUs each host reserves from Ray (its share of them, where several share a node).
        host_threads: torch threads of a CPU host; default every CPU of its node but one
            (at least one), since its trials wait while it computes and the last core runs
            Tune's driver (Ray would otherwise cap it at ``host_cpus`` threads).
        run_ahead: iterations a slot may train past the last result its trial took, so the
            host keeps every slot busy while Tune turns results around. Saves, pauses, stops
            and restores still see exactly the state Tune knows; each slot keeps
            ``run_ahead + 1`` copies of its state. 0 steps a slot only while its trial waits.
        move_slots: move a trial's slot, at a result boundary, where it trains sooner: from a host
            that computes nearly all the time to one that idles, and into a stack made after it
            that takes it (a wider, padded stack of its model family). A move is a pause and a
            restore that Tune does not see (see :mod:`ray_modelbatch.tune.balance`).
        trial_resources: resources of each proxy trial (default ``{"CPU": 0.01}``); no GPU: the
            hosts hold the GPUs.
        idle_timeout_s: hosts (and the experiment's registry) stop this long after their last
            trial left, so nothing outlives ``fit()`` or a killed driver for longer; a trial
            that comes later simply starts new hosts.
        stats_every_s: how often each host writes its own TensorBoard figures
            (under ``<experiment dir>/slot_hosts/<host>``).
        lease_check_s: how often a host looks for trials whose process died
            without detaching, and frees their slots.
        host_start_timeout_s: how long a new host may take to start (scheduling, torch
            import, ``data()``); one that is not up by then is dropped and tried again later.
    """
    gpus = {k: v for k, v in (trial_resources or {}).items() if str(k).lower() == "gpu" and v}
    if gpus:
        raise ValueError(f"trial_resources={trial_resources} reserves a GPU for each trial, but a trial trains on "
                         "its slot host, which holds the GPU itself: the hosts would take every GPU and the trials "
                         "wait for one forever. Fix: leave GPUs out of trial_resources (the default {'CPU': 0.01}); "
                         "one host per GPU is the default, hosts_per_gpu= shares one.")
    spec = SlotSpec(
        model=model, optimizer=optimizer, hparams=hparams, loss=loss, data=data, metrics=dict(metrics or {}),
        train_step=train_step, eval_step=eval_step, stack_by=tuple(stack_by), plateau_metric=plateau_metric,
        host_memory=host_memory, data_workers=int(data_workers),
        batch_size=batch_size, steps_per_report=steps_per_report, slots_per_host=slots_per_host,
        data_mode=data_mode, eval_batch_size=eval_batch_size, seed_key=seed_key,
        autocast_dtype=autocast_dtype, device=device, cpu_gemm=cpu_gemm,
    )
    options = {
        "steps_per_report": steps_per_report if steps_per_report == "epoch" else int(steps_per_report),
        "slots_per_host": slots_per_host if slots_per_host == "auto" else int(slots_per_host),
        "profile_config": dict(profile_config) if profile_config is not None else None,
        "max_slots_per_host": int(max_slots_per_host),
        "num_hosts": num_hosts,
        "cpu_hosts_per_node": check_cpu_hosts_per_node(cpu_hosts_per_node),
        "hosts_per_gpu": check_hosts_per_gpu(hosts_per_gpu),
        "host_cpus": host_cpus,
        "host_threads": host_threads,
        "run_ahead": int(run_ahead),
        "move_slots": bool(move_slots),
        "data_in_driver": bool(data_in_driver),
        "trial_resources": trial_resources,
        "idle_timeout_s": float(idle_timeout_s),
        "stats_every_s": float(stats_every_s),
        "lease_check_s": float(lease_check_s),
        "host_start_timeout_s": float(host_start_timeout_s),
    }
    attrs = {
        "_spec_bytes": cloudpickle.dumps(spec),
        "_experiment": uuid.uuid4().hex[:12],
        "_options": options,
        "max_concurrent": classmethod(_max_concurrent),
        "host_stats": classmethod(_host_stats),
        "shutdown_hosts": classmethod(_shutdown_hosts),
        "load_model": classmethod(_load_model),
        "load_state": classmethod(_load_state),
    }
    return type(name, (SlotTrialProxy,), attrs)


def _max_concurrent(cls: type[SlotTrialProxy]) -> int:
    """Slots this trainable has on the current Ray cluster: use as ``max_concurrent_trials``.

    With ``slots_per_host="auto"`` this starts the hosts (each profiles its device)
    and sums their capacities, so it needs ``profile_config``. Starts Ray with its
    defaults when it is not running yet, as ``Tuner.fit()`` would.
    """
    if not ray.is_initialized():
        ray.init()
    if cls._options["slots_per_host"] != "auto":
        return len(planned_hosts(cls._options)) * int(cls._options["slots_per_host"])
    if cls._options.get("profile_config") is None:
        raise ValueError(
            "max_concurrent() with slots_per_host='auto' must profile a model before any trial runs: pass "
            "batched_trainable(profile_config=<the config of the largest model in the sweep>)."
        )
    load_data = cls._options.get("data_in_driver", True) and not registry_exists(cls._experiment)
    registry = get_registry(cls._spec_bytes, cls._experiment, cls._options, data_pending=load_data)
    if load_data:  # the hosts start meanwhile and take it (see shared_data)
        load_in_driver(cls._spec_bytes, registry)
    return ray.get(registry.start_hosts.remote(cls._options["profile_config"]))


def _load_state(cls: type[SlotTrialProxy], checkpoint: Any) -> dict:
    """Everything a trial's checkpoint holds, as plain tensors and types.

    ``checkpoint`` is a ``Result``'s ``tune.Checkpoint`` (``result.checkpoint``,
    ``result_grid.get_best_result().checkpoint``) or its directory. Keys:
    ``"model"`` (the ``state_dict``), ``"optimizer"`` (``steps``, the per-parameter
    ``state`` in the stack's flat layout, ``hparams``), ``"config"`` (the trial's
    config), ``"stream"`` (the data position), ``"signature"``. Needs neither Ray
    nor a slot host.
    """
    from .. import checkpoint as slot_checkpoint

    return slot_checkpoint.read(checkpoint)


def _load_model(cls: type[SlotTrialProxy], checkpoint: Any, config: Mapping[str, Any] | None = None) -> Any:
    """The trial's trained ``nn.Module``: built by ``model(config)`` and loaded with the checkpoint's weights.

    ``config`` defaults to the trial's own config, saved with the checkpoint.
    The module is returned in eval mode on the CPU; the optimizer state is in
    :meth:`load_state`. Needs neither Ray nor a slot host.
    """
    from .. import checkpoint as slot_checkpoint

    spec = cloudpickle.loads(cls._spec_bytes)
    return slot_checkpoint.build_model(spec.model, slot_checkpoint.read(checkpoint), config)


def _host_stats(cls: type[SlotTrialProxy]) -> list[dict]:
    """Per-host figures (busy fraction, fused steps, free slots) of this trainable's running hosts."""
    try:
        registry = ray.get_actor(registry_name(cls._experiment), namespace=NAMESPACE)
    except ValueError:
        return []
    return ray.get(registry.stats.remote())


def _shutdown_hosts(cls: type[SlotTrialProxy]) -> None:
    """Stop this trainable's registry and hosts now instead of waiting for the idle timeout."""
    try:
        registry = ray.get_actor(registry_name(cls._experiment), namespace=NAMESPACE)
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
