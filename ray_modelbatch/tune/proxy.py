"""The trainable a user hands to Tune: a ``Trainable`` whose trials train on a shared slot host.

Every stacked model is a real Tune trial: Tune's schedulers, searchers,
checkpointing and loggers see ordinary trials. A trial's process holds no
model and imports no torch; its side of the slot is
:class:`~ray_modelbatch.tune.slot_client.SlotClient`. Where
``ray_compat.run_trials_as_light_actors`` is installed (Ray 2.60), the driver
runs each trial as a :class:`~ray_modelbatch.tune.trial_actor.SlotTrialActor`
(by default an object in the driver's one trial server, see
:mod:`~ray_modelbatch.tune.trial_server`), which does not import ``ray.tune``
either, and this class is only what the driver sees (resources, the prestart
of the hosts and the trial server). It is the trial's process itself (the
classic path, which imports ``ray.tune``) under any other Ray, for subclasses
of the trainable, outside Tune, and with ``RAY_MODELBATCH_TRIALS=classic``.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.tune import Trainable
from ray.tune.execution.placement_groups import PlacementGroupFactory

from .ray_compat import (experiment_dir, patch_tune_driver, quiet_setup_time_notice, skip_taken_checkpoint_dirs,
                         trial_mode, with_parameters_keys)
from .registry import get_registry, launch_where_free, planned_hosts, registry_exists
from .shared_data import load_in_driver
from .shared_trials import serve_on_host, trial_server
from .slot_client import SlotClient, with_parameters_error

logger = logging.getLogger(__name__)

# Tune's controller runs in the driver, which imports this module to build the trainable: from here on
# it runs batched trials as light actors, neither deletes a checkpoint a PBT recipient has yet to load
# (num_to_keep) nor stops a recipient with a decision left over from before its exploit (see ray_compat).
patch_tune_driver()


def _one_host_here(options: dict) -> bool:
    """Whether the sweep plans one slot host, on this (the driver's) node: then that host holds the trials'
    actor objects (see ``trial_table``). On another node they would write their checkpoints there, where a
    local ``storage_path`` is not: the trial server, which runs beside the driver, holds them instead."""
    plan = planned_hosts(options)
    return len(plan) == 1 and plan[0].node_id in (None, ray.get_runtime_context().get_node_id())


class SlotTrialProxy(SlotClient, Trainable):
    """Base class of the trainables returned by :func:`ray_modelbatch.tune.batched_trainable`."""

    _prestarted: str = ""  # the experiment whose hosts this driver process already asked for

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """``tune.with_parameters(T, ...)`` subclasses ``T``: refused here, in the driver, once, instead of in
        every trial's setup (see ``SlotClient.setup``)."""
        super().__init_subclass__(**kwargs)
        keys = with_parameters_keys(cls)
        if keys:
            raise with_parameters_error(keys)

    @classmethod
    def default_resource_request(cls, config: dict) -> PlacementGroupFactory:
        cls._prestart_hosts(config)
        return PlacementGroupFactory([dict(cls._options.get("trial_resources") or {"CPU": 0.01})])

    @classmethod
    def _prestart_hosts(cls, config: dict) -> None:
        """Start the registry and its hosts as soon as Tune makes the first trial, without waiting.

        Tune asks the driver for a trial's resources before it requests any
        placement group, so the host's process (torch import, ``data()``, the
        first stack) starts ahead of the trial processes instead of behind
        them: Ray starts at most one worker process per CPU at a time, and the
        first trial would otherwise wait until every trial process of the
        first wave had started (measured: first result 20-24 s after ``fit()``
        with 8-16 trials on 2 CPUs). Runs once per experiment, in the driver.
        """
        if cls._prestarted == cls._experiment or not cls._experiment or not ray.is_initialized():
            return
        if ray.get_runtime_context().get_actor_id() is not None:
            return  # inside a trial: its setup() attaches anyway
        cls._prestarted = cls._experiment
        starting, registry = [], None
        try:
            config = cls._options.get("profile_config") or config
            # The driver creates the hosts itself when the registry does not exist yet: their processes then
            # start now, not once the registry's own actor has started (0.15-0.5 s on a 2-core node).
            new = not registry_exists(cls._experiment)
            on_host = new and trial_mode(cls) == "shared" and _one_host_here(cls._options)
            if new:
                starting = launch_where_free(cls._spec_bytes, cls._experiment, cls._options, config, taken=set(),
                                             first=0, any_running=False, warn=False,  # the registry warns
                                             serves_trials=on_host)[0]
            # A new registry's hosts take the data this driver loads meanwhile (see shared_data).
            load_data = new and cls._options.get("data_in_driver", True)
            registry = get_registry(cls._spec_bytes, cls._experiment, cls._options, starting, data_pending=load_data)
            if load_data:
                load_in_driver(cls._spec_bytes, registry)
            registry.start_hosts.remote(config, quiet=True)  # not awaited
            if on_host and len(starting) == 1:
                serve_on_host(starting[0].handle)
            elif trial_mode(cls) in ("shared", "server"):
                trial_server()  # its process starts beside the host's, before Tune makes the first trial
        except Exception as exc:  # noqa: BLE001 - only a head start: the first trial's setup() tries again
            logger.debug("could not prestart the slot hosts: %s", exc)
            if registry is None:  # nobody holds the hosts made here, and the registry will reuse their names
                for s in starting:
                    ray.kill(s.handle, no_restart=True)

    # ------------------------------------------------------------ Trainable's hooks
    def setup(self, config: dict, **params: Any) -> None:
        quiet_setup_time_notice()
        SlotClient.setup(self, config, **params)

    def _experiment_dir(self) -> str | None:
        return experiment_dir(self)

    def _skip_taken_checkpoints(self) -> None:
        skip_taken_checkpoint_dirs(self)
