"""Every place the Tune layer leans on Ray internals or works around a Ray bug, in one file.

Each function names the Ray version it was written against and what to check
when Ray changes. Nothing else in ``ray_modelbatch`` reaches into
``ray._private`` or a ``Trainable``'s private attributes; when a Ray upgrade
breaks something, this file is the place to look. Imports no torch.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import weakref
from typing import Any, Callable

logger = logging.getLogger(__name__)

TESTED_RAY = "2.60"  # the Ray version these workarounds were written against and tested with

_installed: set[str] = set()  # the workarounds installed in this process, by name


def _install_once(install: Callable[[], bool | None]) -> Callable[[], None]:
    """Run a workaround's installer once per process; one that returns False (its Ray internals are not there,
    another Ray) is tried again at the next call, and never half-installed."""

    @functools.wraps(install)
    def run() -> None:
        if install.__name__ not in _installed and install() is not False:
            _installed.add(install.__name__)

    return run


def available_resources_per_node() -> dict[str, dict[str, float]] | None:
    """Free resources of each alive node, or None when this Ray has no such call.

    Ray 2.60: ``ray._private.state.available_resources_per_node()``; there is no
    public per-node equivalent (``ray.available_resources()`` sums the cluster).
    The registry uses it to start a host only on a node whose GPU or CPUs are
    free now; without it, it tries every planned place and lets Ray queue.
    """
    try:
        from ray._private import state as ray_state

        return ray_state.available_resources_per_node()
    except Exception:  # noqa: BLE001 - a private API: absent or changed means "unknown"
        return None


def skip_taken_checkpoint_dirs(trainable: Any) -> None:
    """Never let a trial write a checkpoint into a ``checkpoint_N`` directory that already exists.

    Ray Tune 2.60 race, hit by batched trials at almost every synchronous
    PBT/PB2 perturbation (all slots report in the same fused step): a top
    trial whose pause-checkpoint is still being saved is saved a second time
    by PBT; the pause then drops the second save's future, so the driver's
    checkpoint index lags the files by one. The trial's next actor starts
    from that index and overwrites the newest checkpoint, which is the very
    one PBT told the recipients to restore (they would silently load a later
    state with the earlier iteration count). Reads ``Trainable._storage``
    (a ``StorageContext``: ``trial_fs_path``, ``current_checkpoint_index``).
    Check on upgrade: ``tests/test_tune_schedulers.py`` PBT tests.
    """
    storage = getattr(trainable, "_storage", None)
    if storage is None or getattr(storage, "trial_dir_name", None) is None:
        return
    fs = storage.storage_filesystem
    taken = taken_checkpoint_index(None if _is_local(fs) else fs, storage.trial_fs_path)
    if taken is not None and storage.current_checkpoint_index < taken:
        storage.current_checkpoint_index = taken  # the next save takes taken + 1


def taken_checkpoint_index(fs: Any, trial_fs_path: str) -> int | None:
    """The highest ``N`` of the ``checkpoint_N`` directories in a trial's directory, or None.

    ``fs`` is a pyarrow filesystem, or None for the local disk (read without
    importing pyarrow). Best effort: an unreadable directory reads as None.
    """
    try:
        if fs is None:
            names = os.listdir(trial_fs_path) if os.path.isdir(trial_fs_path) else []
        else:
            import pyarrow.fs

            infos = fs.get_file_info(pyarrow.fs.FileSelector(trial_fs_path, allow_not_found=True))
            names = [i.base_name for i in infos]
    except Exception:  # noqa: BLE001 - best effort; Tune's own index is the fallback
        return None
    taken = [int(m.group(1)) for n in names if (m := re.fullmatch(r"checkpoint_(\d+)", n))]
    return max(taken) if taken else None


_managers: weakref.WeakSet = weakref.WeakSet()  # every Tune checkpoint manager of this (driver) process
_pbt_states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # PBT per-trial state -> ref to its trial
_future_checkpoints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # PBT's save future -> its checkpoint
_deferred: dict[str, tuple[Any, str]] = {}  # fs_path -> (filesystem, fs_path): retention deletions put off


@_install_once
def keep_restore_sources() -> bool | None:
    """Never let checkpoint retention delete a checkpoint that a trial will still restore from.

    Ray Tune 2.60 bug, hit by PBT/PB2 with ``CheckpointConfig(num_to_keep=N)``
    (the recipient fails in ``Trainable.restore`` with "Could not recover from
    checkpoint as it does not exist on storage anymore"):

    * ``PopulationBasedTraining._exploit`` (``tune/schedulers/pbt.py``) points
      the recipient's ``checkpoint_manager._latest_checkpoint_result`` at a
      shallow copy of the donor's checkpoint: a directory in the *donor's*
      trial directory. The recipient restores from it only when its paused
      trial starts again.
    * The donor's ``_CheckpointManager.register_checkpoint``
      (``train/_internal/checkpoint_manager.py``) deletes every checkpoint
      older than its newest ``num_to_keep`` except its *own* latest; nothing
      tells it another trial still needs one. Neither does anything protect
      ``_PBTTrialState.last_checkpoint`` (a checkpoint, or the future of a
      save PBT resolves only then), which PBT hands out at the next exploit
      of that donor: async PBT lets the donor save ``N`` more times first.
    * Synchronous PBT restarts its paused trials one at a time, in trial
      order (``choose_trial_to_run`` and ``TuneController._maybe_add_actors``);
      asynchronous PBT lets the donor run on while the recipient's trial
      process starts. A batched slot trains an iteration in a fraction of the
      seconds a trial process takes to start, so the donor saves ``N`` times
      and deletes the checkpoint before its recipient loads it. Standard Tune
      fails the same way when its iterations are that short.

    The workaround wraps the donor's deletion: a checkpoint directory that is
    some trial's latest checkpoint, or the one PBT would clone from a running
    trial, is not deleted but put off, and deleted at the next registration
    after no trial needs it any more. Each trial needs at most those two, so
    the directories kept beyond ``num_to_keep`` number at most two per trial
    (at the end of a sweep, at most PBT's last one of the trial that ended
    last); Tune's own bookkeeping is unchanged. Runs in the process that drives
    Tune (the proxy module calls it at import); idempotent, torch-free. Check
    on upgrade: ``tests/test_tune_pbt_keep.py``, and whether Ray still deletes
    through ``checkpoint_manager._delete_fs_path``.
    """
    try:
        import ray
        from ray.train import Checkpoint
        from ray.train._internal import checkpoint_manager
        from ray.train._internal.session import _FutureTrainingResult
        from ray.tune.schedulers import pbt

        manager_cls, state_cls = checkpoint_manager._CheckpointManager, pbt._PBTTrialState
        delete = checkpoint_manager._delete_fs_path
        register = manager_cls.register_checkpoint
        manager_init, state_init = manager_cls.__init__, state_cls.__init__
    except (ImportError, AttributeError) as exc:  # another Ray: tests/test_tune_pbt_keep.py tells if still needed
        logger.debug("not installing the PBT checkpoint-retention workaround (Ray %s): %s", TESTED_RAY, exc)
        return False

    def needed() -> set[str]:
        """Paths some trial may still restore from: latest checkpoints, and PBT's checkpoints to clone."""
        paths = set()
        for manager in list(_managers):
            latest = getattr(manager, "_latest_checkpoint_result", None)
            if latest is not None and latest.checkpoint is not None:
                paths.add(_path_key(latest.checkpoint.path))
        for state, trial_ref in list(_pbt_states.items()):
            trial = trial_ref()
            if trial is None or trial.is_finished():
                continue  # PBT never clones a finished trial
            checkpoint = state.last_checkpoint
            if isinstance(checkpoint, _FutureTrainingResult):  # PBT resolves it only at the exploit
                checkpoint = saved_checkpoint(checkpoint)
            if isinstance(checkpoint, Checkpoint):
                paths.add(_path_key(checkpoint.path))
        return paths

    def saved_checkpoint(future: Any) -> Any:
        """The checkpoint of a PBT-requested save that has finished, else None (never waits)."""
        if future not in _future_checkpoints:
            try:
                result = ray.get(future.future, timeout=0)
            except Exception:  # noqa: BLE001 - still saving (nothing to delete yet) or failed
                return None
            _future_checkpoints[future] = getattr(result, "checkpoint", None)
        return _future_checkpoints[future]

    def delete_unless_needed(fs: Any, fs_path: str) -> None:
        key = _path_key(fs_path)
        if key in needed():
            logger.debug("keeping %s until no trial restores from it (PBT)", fs_path)
            _deferred[key] = (fs, fs_path)
            return
        delete(fs=fs, fs_path=fs_path)

    def register_checkpoint(self: Any, checkpoint_result: Any) -> None:
        _managers.add(self)  # also one unpickled from an experiment state (Tuner.restore)
        register(self, checkpoint_result)
        if _deferred:
            still = needed()
            for key in [k for k in _deferred if k not in still]:
                fs, fs_path = _deferred.pop(key)
                delete(fs=fs, fs_path=fs_path)

    def track_manager(self: Any, *args: Any, **kwargs: Any) -> None:
        manager_init(self, *args, **kwargs)
        _managers.add(self)

    def track_manager_unpickled(self: Any, state: dict) -> None:
        self.__dict__.update(state)
        _managers.add(self)

    def track_state(self: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
        state_init(self, trial, *args, **kwargs)
        _pbt_states[self] = weakref.ref(trial)

    checkpoint_manager._delete_fs_path = delete_unless_needed
    manager_cls.register_checkpoint = register_checkpoint
    manager_cls.__init__ = track_manager
    if "__setstate__" not in manager_cls.__dict__:
        manager_cls.__setstate__ = track_manager_unpickled
    state_cls.__init__ = track_state


def _path_key(fs_path: str) -> str:
    return fs_path.rstrip("/")




@_install_once
def drop_stale_stop_on_pause() -> bool | None:
    """Never let a PBT recipient be stopped by a STOP left over from before its exploit.

    Ray Tune 2.60 bug, hit by synchronous PBT/PB2 whenever checkpoints are
    saved between perturbations (``CheckpointConfig(checkpoint_frequency)``):
    the recipient ends one iteration after its exploit, TERMINATED without an
    error, its remaining iterations silently lost.

    * All slots of a stack report in the same fused step, so when the last
      trial reaches the perturbation the others' pause-checkpoints are still
      being saved. ``PopulationBasedTraining._exploit`` pauses such a
      recipient with ``pause_trial(trial, should_checkpoint=False)``.
    * ``TuneController._schedule_trial_stop`` (``tune/execution/tune_controller.py``)
      sees the save in flight and caches a STOP decision "to run after the save
      resolves", then clears the actor's futures: the save never resolves, the
      trial is set PAUSED, and the STOP stays in ``_cached_trial_decisions``.
    * After the recipient restarts, its next save pops that STOP
      (``_process_trial_save``), which wins over CONTINUE (``_queue_decision``)
      and terminates the trial. A pause-checkpoint of its own clears it
      instead (``pause_trial`` pops cached decisions), which is why
      ``checkpoint_frequency=0`` sweeps never showed it.

    The workaround drops a trial's cached decision once ``_schedule_trial_pause``
    has stopped it without a checkpoint: its futures are gone, so no save can
    act on it. Runs in the process that drives Tune; idempotent. Check on
    upgrade: ``tests/test_tune_pbt_keep.py`` (the sync sweep must reach its
    last iteration in every trial).
    """
    try:
        from ray.tune.execution.tune_controller import TuneController
        from ray.tune.experiment import Trial

        pause = TuneController._schedule_trial_pause
    except (ImportError, AttributeError) as exc:
        logger.debug("not installing the PBT stale-STOP workaround (Ray %s): %s", TESTED_RAY, exc)
        return False

    def schedule_trial_pause(self: Any, trial: Any, should_checkpoint: bool = True) -> None:
        pause(self, trial, should_checkpoint=should_checkpoint)
        if not should_checkpoint and trial.status == Trial.PAUSED:
            getattr(self, "_cached_trial_decisions", {}).pop(trial.trial_id, None)

    TuneController._schedule_trial_pause = schedule_trial_pause




@_install_once
def stop_late_pauses_of_finished_brackets() -> bool | None:
    """Stop a HyperBand trial whose pause completes after its bracket finished, as the bracket stops the others.

    Ray Tune 2.60 bug (plain Tune too): ``HyperBandScheduler`` pauses each trial
    that reaches its bracket's last milestone until the rest get there; the
    last one's result finishes the bracket, and ``_Bracket.cleanup_full``
    (``tune/schedulers/hyperband.py``) stops the trials that are PAUSED. A
    trial whose pause-checkpoint is still being saved is RUNNING then
    (``is_saving``), so it is passed over, becomes PAUSED when its save
    resolves, and nothing ever resumes or stops it: ``fit()`` never returns,
    its controller spinning. Every other branch of ``_process_bracket`` treats
    ``is_saving`` as PAUSED; this one does not. A plain ``tune.Trainable``
    whose ``save_checkpoint`` takes 1.5 s hangs so with four trials,
    ``max_t=2`` (``tests/test_tune_schedulers.py``); a slot host's trials,
    which reach a milestone in the same fused step, hung a 6-trial sweep.

    The workaround completes ``cleanup_full``'s work where the late pause
    lands: once ``TuneController.pause_trial`` has left a trial PAUSED, a
    trial of a finished bracket that is not waiting to be resumed is stopped
    (``stop_trial``, as ``cleanup_full`` does), its pause-checkpoint kept.
    Runs in the process that drives Tune; idempotent.
    """
    try:
        from ray.tune.execution.tune_controller import TuneController
        from ray.tune.experiment import Trial
        from ray.tune.schedulers import HyperBandScheduler

        pause = TuneController.pause_trial
    except (ImportError, AttributeError) as exc:
        logger.debug("not installing the HyperBand late-pause workaround (Ray %s): %s", TESTED_RAY, exc)
        return False

    def pause_trial(self: Any, trial: Any, should_checkpoint: bool = True) -> None:
        pause(self, trial, should_checkpoint=should_checkpoint)
        scheduler = getattr(self, "_scheduler_alg", None)
        if trial.status != Trial.PAUSED or not isinstance(scheduler, HyperBandScheduler):
            return
        bracket = (getattr(scheduler, "_trial_info", {}).get(trial) or (None,))[0]
        if (bracket is not None and trial in bracket.current_trials() and bracket.finished()
                and trial not in bracket.trials_to_unpause):
            logger.debug("Trial %s paused after its HyperBand bracket finished: stopping it", trial)
            self.stop_trial(trial)

    TuneController.pause_trial = pause_trial




_MISSING_METRIC = re.compile(r"did not include the specified metric\(s\) `(?P<metric>.+?)` that `(?P<where>.+?)` expects")
_TUNE_KEYS = {"done", "training_iteration", "trial_id", "date", "timestamp", "time_this_iter_s", "time_total_s", "pid",
              "hostname", "node_ip", "time_since_restore", "iterations_since_restore", "checkpoint_dir_name",
              "should_checkpoint", "slot", "stack", "host", "host_node"}


@_install_once
def name_missing_metrics_of_batched_trials() -> bool | None:
    """Say in one line which metric a batched trial lacks, what it reports instead, and the likely typo.

    Ray Tune 2.60 (``TuneController._validate_result_metrics``,
    ``tune/execution/tune_controller.py``) raises a ``ValueError`` at a trial's
    first result when ``TuneConfig(metric=...)``, the scheduler's or the
    searcher's metric is not in it. Its message tells the user to fix their
    ``tune.report()`` calls, which a batched trial has none of (the slot host
    reports for it), and then prints the whole flattened result, configs
    included. For a result from a slot host (its ``slot``/``stack``/``host``
    keys) the wrapper raises the same error type with the metric, who expects
    it, the metrics the trial does report and the closest of them. Other
    trials get Tune's message unchanged.
    """
    try:
        from ray.tune.execution.tune_controller import TuneController

        validate = TuneController._validate_result_metrics
    except (ImportError, AttributeError) as exc:
        logger.debug("not installing the missing-metric message (Ray %s): %s", TESTED_RAY, exc)
        return False

    def validate_result_metrics(self: Any, result: dict) -> None:
        try:
            validate(self, result)
        except ValueError as exc:
            found = _MISSING_METRIC.search(str(exc))
            if found is None or not {"slot", "stack", "host"} <= set(result):
                raise
            raise ValueError(missing_metric_message(found["metric"], found["where"], result)) from None

    TuneController._validate_result_metrics = validate_result_metrics


def missing_metric_message(metric: str, where: str, result: dict) -> str:
    """One line: the metric ``where`` expects, what a batched trial's ``result`` has instead, the closest name."""
    import difflib

    have = sorted(k for k in result if k not in _TUNE_KEYS and not k.startswith("config/"))
    wanted = [m.strip("'\" ") for m in metric.strip("[]").split(",")]
    close = [c for m in wanted for c in difflib.get_close_matches(m, have, n=1)]
    hint = f" Did you mean {', '.join(f'`{c}`' for c in close)}?" if close else ""
    return (f"ray_modelbatch: `{where}` expects the metric {', '.join(f'`{m}`' for m in wanted)}, which the batched "
            f"trials do not report; they report {', '.join(have)}.{hint} Name one of these there, or report yours "
            "(batched_trainable(metrics={name: fn}) adds val_<name>).")


@_install_once
def stop_sweep_on_setup_error() -> bool | None:
    """End the whole sweep at the first trial that fails with a :class:`~ray_modelbatch.errors.SweepSetupError`.

    Such an error (``data()`` returned the wrong items, the trainable's functions
    cannot be loaded on the host) is the same for every trial of the sweep, so
    Tune would print it once per trial, each with a Ray traceback. Ray Tune 2.60
    (``tune/execution/tune_controller.py``): every trial failure, of a task or of
    the trial actor's creation, passes ``TuneController._trial_task_failure``, and
    ``_stop_experiment_if_needed`` (after each event) stops every trial once
    ``_should_stop_experiment`` is set, the flag a scheduler's "stop all" sets. The
    wrapper sets it at the first such failure, which Tune reports as usual, and
    fails every other pending or running trial of the sweep with the same error
    (ERROR, as it would have ended, so the ``ResultGrid`` shows no trial as
    finished): Tune's own handling of a failure minus its traceback print and its
    retry (``_fail_quietly``). A trial that fails with another of this library's errors (a
    hyperparameter, a config key, a shape) is handled as Tune handles it, retries included, but
    logged in one line instead of a traceback of the host's internals. Idempotent. Check on upgrade:
    ``tests/test_tune_lifecycle.py``, the bad-data test.
    """
    try:
        from ray.tune.execution.tune_controller import TuneController

        task_failure = TuneController._trial_task_failure
    except (ImportError, AttributeError) as exc:
        logger.debug("not installing the stop-on-setup-error hook (Ray %s): %s", TESTED_RAY, exc)
        return False

    def trial_task_failure(self: Any, trial: Any, exception: Exception) -> None:
        if "SweepSetupError" not in f"{type(exception).__name__} {exception}":
            if _host_died_under(trial, exception) and self._fail_fast != self.RAISE:
                if self._print_trial_errors:
                    logger.error("Trial task failed for trial %s: %s", trial, host_died_message(trial, exception))
                return self._process_trial_failure(trial, exception=exception)
            if _is_library_error(exception) and self._fail_fast != self.RAISE:
                # Tune's handling (retries included) with its message in one line instead of a traceback of
                # the host's internals: the message names the problem and the fix
                if self._print_trial_errors:
                    logger.error("Trial task failed for trial %s: %s", trial, _last_line(str(exception)))
                return self._process_trial_failure(trial, exception=exception)
            return task_failure(self, trial, exception)
        if getattr(self, "_rmb_setup_error", False):
            _fail_quietly(self, trial, exception)  # the sweep is stopping for this very reason: no second report
            return None
        self._rmb_setup_error = True
        self._should_stop_experiment = True
        task_failure(self, trial, exception)
        logger.error("ray_modelbatch: stopping the sweep, since every trial would fail the same way: %s",
                     _last_line(str(exception)))
        for other in list(self._trials):
            if other is not trial:
                _fail_quietly(self, other, exception)
        return None

    TuneController._trial_task_failure = trial_task_failure


def _host_died_under(trial: Any, exception: BaseException) -> bool:
    """Whether a batched trial's actor died: it is an object in its slot host's process (the default with one
    host) or in the driver's trial server, so that process died, and every trial it served with it."""
    import ray

    try:
        return isinstance(exception, ray.exceptions.RayActorError) and is_light(trial.get_trainable_cls())
    except Exception:  # noqa: BLE001 - a trial without a trainable class: Tune's own report
        return False


def host_died_message(trial: Any, exception: BaseException) -> str:
    """One line for a batched trial whose slot host died: what happened, and whether Tune restarts it."""
    failures, allowed = getattr(trial, "num_failures", 0) + 1, getattr(trial, "max_failures", 0)
    if allowed < 0 or failures <= allowed:
        then = (f"Tune restarts it from its last checkpoint on a new host (failure {failures} of the "
                f"{'unlimited' if allowed < 0 else allowed} that tune.FailureConfig(max_failures) allows).")
    elif allowed == 0:
        then = ("Set tune.FailureConfig(max_failures>=1) so that Tune restarts such trials from their last "
                "checkpoint on a new host; tune.CheckpointConfig(checkpoint_frequency=N) bounds the iterations lost.")
    else:
        then = f"It has failed {failures} times, more than tune.FailureConfig(max_failures={allowed}) allows."
    who = "the driver's trial server" if "TrialServer" in str(exception) else "its slot host"
    return (f"{who} died ({type(exception).__name__}), and every trial it served with it (their actors live in its "
            f"process). {then}")


def _is_library_error(exception: BaseException) -> bool:
    """Whether a trial failed with one of ray_modelbatch's own errors (in a Ray task error, its ``cause``)."""
    from ..errors import ModelBatchError

    return isinstance(getattr(exception, "cause", exception), ModelBatchError)


def _fail_quietly(controller: Any, trial: Any, exception: Exception) -> None:
    """End a pending or running ``trial`` in ERROR with ``exception``, as Ray Tune 2.60's
    ``TuneController._process_trial_failure`` does, without its traceback in the log and without a retry
    (``FailureConfig.max_failures``): the error is the sweep's, printed once already."""
    from ray.tune.experiment import Trial

    if trial.status not in (Trial.PENDING, Trial.RUNNING):
        return
    trial.init_local_path()  # a trial that never started has no folder for its error file yet
    trial.handle_error(exception)
    controller._scheduler_alg.on_trial_error(controller, trial)
    controller._search_alg.on_trial_complete(trial.trial_id, error=True)
    controller._schedule_trial_stop(trial, exception=exception)
    controller._callbacks.on_trial_error(iteration=controller._iteration, trials=controller._trials, trial=trial)


def _last_line(text: str) -> str:
    """The line of a (remote) traceback that says what went wrong: its last non-empty one."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


_light_choice: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # trainable class -> trial_mode()


@_install_once
def run_trials_as_light_actors() -> bool | None:
    """Run each batched trial as a :class:`~ray_modelbatch.tune.trial_actor.SlotTrialActor` (no ``ray.tune`` in it).

    Why: starting the trial processes is most of a small node's sweep (see the
    ``trial_actor`` docstring: 0.80 instead of 1.67 CPU-s per process). Ray
    Tune 2.60 (``tune/execution/tune_controller.py``) makes a trial's actor from
    ``_ActorClassCache.get(trainable_cls)`` with ``_get_trainable_kwargs(trial)``
    and calls it through ``TuneController._schedule_trial_task``. For a class
    made by ``batched_trainable`` (not a subclass: its overrides would be lost),
    the wrappers here substitute the light actor class (by default a
    :class:`~ray_modelbatch.tune.shared_trials.SharedTrialClass`, whose trials
    are objects in one trial server; see :func:`trial_mode`) and hand it plain data:

    * the actor's kwargs and ``reset``'s: the config without Tune's magic keys,
      ``trial`` (id, name, log files) and ``storage`` (:func:`light_storage`)
      instead of ``_TrialInfo`` and ``StorageContext``;
    * ``restore``'s checkpoint: ``{"path", "filesystem", "metrics"}`` instead
      of a ``_TrainingResult``;
    * ``save`` returns a :class:`SavedCheckpoint`, which unpickles in the driver
      as the ``_TrainingResult`` that ``Trainable.save`` returns (also where PBT
      ``ray.get``s the future itself).

    Everything else of Tune (scheduling, results, checkpoint bookkeeping,
    callbacks) is unchanged. Under another Ray the wrappers are not installed
    and the trial runs the classic ``Trainable`` proxy. Check on upgrade: the
    light-actor tests of ``tests/test_tune_trial_actor.py`` and the rest of the
    Tune tests, which run through it.
    """
    try:
        from ray.tune.execution import tune_controller
        from ray.tune.execution.class_cache import _ActorClassCache
        from ray.tune.result import STDERR_FILE, STDOUT_FILE, TRIAL_INFO

        controller_cls = tune_controller.TuneController
        cache_get, get_kwargs = _ActorClassCache.get, tune_controller._get_trainable_kwargs
        schedule_task = controller_cls._schedule_trial_task
    except (ImportError, AttributeError) as exc:
        logger.debug("not running batched trials as light actors (Ray %s): %s", TESTED_RAY, exc)
        return False
    magic = (TRIAL_INFO, STDOUT_FILE, STDERR_FILE)

    def light_class_get(self: Any, trainable_cls: Any) -> Any:
        if not is_light(trainable_cls):
            return cache_get(self, trainable_cls)
        key = ("ray_modelbatch light actor", trainable_cls)
        if key not in self._cache:
            batched = batched_class(trainable_cls)
            if trial_mode(trainable_cls) in ("shared", "server"):
                from .shared_trials import SharedTrialClass

                self._cache[key] = SharedTrialClass.of(batched)
            else:
                self._cache[key] = cache_get(self, light_actor_class(batched))
        return self._cache[key]

    def plain(trial: Any, config: dict) -> tuple[dict, dict]:
        """The config without Tune's magic keys, and the trial's identity and storage as plain data."""
        clean = {k: v for k, v in config.items() if k not in magic}
        return clean, {"trial": light_trial(trial), "storage": light_storage(trial.storage)}

    def light_kwargs(trial: Any) -> dict:
        kwargs = get_kwargs(trial=trial)
        if not is_light(trial.get_trainable_cls()):
            return kwargs
        config, rest = plain(trial, kwargs["config"])
        return {"config": config, **rest}

    def light_task(self: Any, trial: Any, method_name: str, args: tuple | None = None,
                   kwargs: dict | None = None, **rest: Any) -> Any:
        if method_name in ("restore", "reset") and is_light(trial.get_trainable_cls()):
            if method_name == "restore":
                args = (light_checkpoint(args[0]),)
            else:
                config, kwargs = plain(trial, args[0])
                args = (config,)
        return schedule_task(self, trial, method_name, args, kwargs, **rest)

    _ActorClassCache.get = light_class_get
    tune_controller._get_trainable_kwargs = light_kwargs
    controller_cls._schedule_trial_task = light_task
    _route_kills_of_shared_trials()


def _route_kills_of_shared_trials() -> None:
    """``ray.kill`` of a shared trial's handle ends that trial in the trial server, not a process.

    Ray 2.60 (``air/execution/_internal/actor_manager.py``): ``RayActorManager``
    calls ``ray.kill(handle)`` in ``_try_kill_actor`` (a trial stopped with
    ``kill=True``) and in ``cleanup`` (every live actor at the end of ``fit()``);
    ``ray.kill`` accepts only real actor handles. The wrappers end the shared
    trials first (:meth:`SharedTrialHandle.kill`) and leave real actors to Ray;
    ``cleanup`` also drops the driver's handle of the trial server, whose
    process then ends with the sweep's last trial handle.
    Check on upgrade: ``tests/test_tune_trial_actor.py`` (shared trials).
    """
    from ray.air.execution._internal.actor_manager import RayActorManager

    from .shared_trials import forget_trial_server, is_shared_handle

    try_kill, cleanup = RayActorManager._try_kill_actor, RayActorManager.cleanup

    def try_kill_actor(self: Any) -> bool:
        live = self._live_actors_to_ray_actors_resources
        shared = next((t for t in self._live_actors_to_kill if is_shared_handle(live[t][0])), None)
        if shared is None:
            return try_kill(self)
        self._live_actors_to_kill.discard(shared)
        live[shared][0].kill()
        self._cleanup_actor_futures(shared)
        self._actor_stop_resolved(shared)
        return True

    def cleanup_all(self: Any) -> None:
        live = self._live_actors_to_ray_actors_resources
        for tracked in [t for t, (handle, _) in live.items() if is_shared_handle(handle)]:
            handle, acquired = live.pop(tracked)
            handle.kill()
            self._resource_manager.free_resources(acquired_resource=acquired)
        self._live_resource_cache = None
        forget_trial_server()  # the server ends with the sweep's last trial handle
        return cleanup(self)

    RayActorManager._try_kill_actor = try_kill_actor
    RayActorManager.cleanup = cleanup_all


TRIAL_MODES = ("shared", "server", "process", "classic")


def trial_mode(trainable_cls: Any) -> str:
    """Where a trainable's trial actors run: ``shared``, ``server``, ``process`` or ``classic`` (see below).

    * ``shared`` (the default for a class ``batched_trainable`` made itself):
      every trial's actor is an object in one process: the slot host, where the
      sweep plans only one, on the driver's node (:mod:`~ray_modelbatch.tune.trial_table`), else the
      driver's one trial server (:mod:`~ray_modelbatch.tune.trial_server`); no
      process per trial.
    * ``server``: objects in the driver's trial server, whatever the hosts.
    * ``process``: one light actor process per trial (:mod:`~ray_modelbatch.tune.trial_actor`).
    * ``classic``: one ``Trainable`` process per trial (``SlotTrialProxy``); also
      every subclass of a batched trainable, whose overrides only a
      ``Trainable`` runs.

    Chosen with ``RAY_MODELBATCH_TRIALS`` in the driver's environment
    (``RAY_MODELBATCH_LIGHT_TRIALS=0``, the older switch, means ``classic``).
    Decided once per class, so that every trial of a sweep (and every actor Tune
    reuses among them) gets the same kind.
    """
    trainable_cls = batched_class(trainable_cls)
    if not isinstance(trainable_cls, type) or not vars(trainable_cls).get("_spec_bytes"):
        return "classic"
    if trainable_cls not in _light_choice:
        mode = os.environ.get("RAY_MODELBATCH_TRIALS", "").strip().lower() or (
            "classic" if os.environ.get("RAY_MODELBATCH_LIGHT_TRIALS", "1") == "0" else "shared")
        if mode not in TRIAL_MODES:
            logger.warning("RAY_MODELBATCH_TRIALS=%r is not one of %s; running shared trials (the default). "
                           "Fix: set one of those, or unset it.", mode, ", ".join(TRIAL_MODES))
            mode = "shared"
        _light_choice[trainable_cls] = mode
    return _light_choice[trainable_cls]


# What Ray 2.60's ``tune.with_resources(cls, resources)`` defines on the subclass it returns (ResourceTrainable).
_RESOURCES_WRAPPER = {"default_resource_request", "__module__", "__qualname__", "__doc__", "__name__",
                      "__firstlineno__", "__static_attributes__"}  # (the last two: Python 3.13's class dicts)
_warned_resources: set[str] = set()


def batched_class(trainable_cls: Any) -> Any:
    """The class ``batched_trainable`` made, where ``trainable_cls`` is Tune's ``with_resources`` wrapper of one
    (which only changes the resources each trial reserves), else ``trainable_cls`` itself.

    Ray 2.60 wraps a class with a subclass that overrides
    ``default_resource_request``. Its trials are still batched trials, and run
    as the class's own do (in the shared trial server), with the resources
    asked for. Without this the subclass ran every trial in a ``Trainable``
    process of its own: 4-5x the sweep's time, and Ray's "blocking ray.get
    inside async actor" warning once per trial. (Its hosts start when the
    first trial attaches, not ahead of it: started ahead, a host could take
    the GPU that the trials' own requests were to hold, and they would wait
    for it forever instead of failing with the message that names the fix.)
    """
    if (isinstance(trainable_cls, type) and not vars(trainable_cls).get("_spec_bytes")
            and set(vars(trainable_cls)) <= _RESOURCES_WRAPPER and "default_resource_request" in vars(trainable_cls)):
        base = trainable_cls.__mro__[1]
        if vars(base).get("_spec_bytes"):
            if base._experiment not in _warned_resources:
                _warned_resources.add(base._experiment)
                logger.warning(
                    "tune.with_resources() gives each trial of %s its own resources, but a batched trial only "
                    "forwards to its slot host ({'CPU': 0.01} is enough): they sit idle. Drop with_resources, "
                    "unless you mean to limit how many trials run at once (docs/porting.md).", base.__name__)
            return base
    return trainable_cls


def with_parameters_keys(cls: type) -> list[str] | None:
    """The keys ``tune.with_parameters(trainable, **kwargs)`` gives ``cls``'s trials, or None where it did not make ``cls``.

    Ray 2.60 (``tune/trainable/util.py``): for a class trainable it defines
    ``class _Inner(trainable)`` whose ``setup`` closes over the set ``keys``
    and passes them to ``trainable.setup(config, **kwargs)`` in each trial
    process, so a base class sees the subclass being made (in the driver, at
    the user's call) and can refuse it there, once. An ``_Inner`` whose keys
    cannot be read gives ``["?"]``.
    """
    if cls.__module__ != "ray.tune.trainable.util" or cls.__qualname__.rsplit(".", 1)[-1] != "_Inner":
        return None
    setup = cls.__dict__.get("setup")
    try:
        cells = dict(zip(setup.__code__.co_freevars, setup.__closure__ or ()))
        return sorted(cells["keys"].cell_contents)
    except (AttributeError, KeyError, ValueError, TypeError):
        return ["?"]


def is_light(trainable_cls: Any) -> bool:
    """Whether Tune runs this trainable's trials without ``ray.tune`` in them (``shared`` or ``process``)."""
    return trial_mode(trainable_cls) != "classic"


def light_actor_class(trainable_cls: type) -> type:
    """The light actor class of a batched trainable: the same name (Ray names the process after it) and spec."""
    from .slot_client import spec_attrs
    from .trial_actor import SlotTrialActor

    return type(trainable_cls.__name__, (SlotTrialActor,), spec_attrs(trainable_cls))


def light_trial(trial: Any) -> dict:
    """What the light actor needs of Tune's ``Trial``: its ID, name and log files."""
    stdout_file, stderr_file = trial.log_to_file
    return {"trial_id": trial.trial_id, "trial_name": str(trial),
            "stdout_file": stdout_file, "stderr_file": stderr_file}


def light_storage(storage: Any) -> dict:
    """A ``StorageContext`` as plain data; ``filesystem`` None means the local disk (no pyarrow in the trial)."""
    fs = storage.storage_filesystem
    return {
        "filesystem": None if _is_local(fs) else fs,
        "trial_fs_path": storage.trial_fs_path,
        "experiment_fs_path": storage.experiment_fs_path,
        # Ray's StorageContext._check_validation_file looks for _VALIDATE_STORAGE_MARKER_FILENAME there
        "validation_file": f"{storage.experiment_fs_path}/.validate_storage_marker",
        "checkpoint_index": storage.current_checkpoint_index,
        "working_dir": storage.trial_working_directory,
    }


def light_checkpoint(checkpoint: Any) -> dict:
    """``restore``'s argument (a ``_TrainingResult``, a ``Checkpoint`` or a path) as plain data."""
    metrics = getattr(checkpoint, "metrics", None) or {}
    checkpoint = getattr(checkpoint, "checkpoint", checkpoint)
    if isinstance(checkpoint, str):
        return {"path": checkpoint, "filesystem": None, "metrics": metrics}
    fs = checkpoint.filesystem
    keep = ("training_iteration", "time_total_s", "timesteps_total", "episodes_total")
    return {"path": checkpoint.path, "filesystem": None if _is_local(fs) else fs,
            "metrics": {k: metrics[k] for k in keep if k in metrics}}


class SavedCheckpoint:
    """A light actor's saved checkpoint; unpickles as Ray Train's ``_TrainingResult`` (Ray 2.60).

    Built in the trial process, which has no ``ray.train``; the driver, which
    has, rebuilds the real object on arrival (:func:`training_result`).
    """

    def __init__(self, path: str, filesystem: Any, metrics: dict) -> None:
        self.path, self.filesystem, self.metrics = path, filesystem, metrics

    def __reduce__(self) -> tuple:
        return training_result, (self.path, self.filesystem, self.metrics)


def training_result(path: str, filesystem: Any, metrics: dict) -> Any:
    """``_TrainingResult(Checkpoint(path, filesystem), metrics)``; a None filesystem is the local disk."""
    import pyarrow.fs
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint  # Trainable's: not ray.train.Checkpoint, a class of its own in Ray 2.60

    fs = pyarrow.fs.LocalFileSystem() if filesystem is None else filesystem
    return _TrainingResult(checkpoint=Checkpoint(path=path, filesystem=fs), metrics=metrics)


def checkpoint_dir_name(index: int) -> str:
    """Ray 2.60 ``StorageContext._make_checkpoint_dir_name``."""
    return f"checkpoint_{index:06d}"


def storage_not_shared_message(experiment_path: str) -> str:
    """Ray 2.60 ``StorageContext._check_validation_file``'s advice, for a trial on a node without the storage."""
    return (
        f"Unable to set up cluster storage: {experiment_path} is not visible from this node. Check that all "
        "nodes in the cluster have read/write access to the configured storage path. `RunConfig(storage_path)` "
        "should be set to a cloud storage URI or a shared filesystem path accessible by all nodes in your "
        "cluster ('s3://bucket' or '/mnt/nfs'). A local path on the head node is not accessible by worker nodes."
    )


def checkpoint_gone_message(path: str, fs_type: str) -> str:
    """Ray 2.60 ``Trainable.restore``'s message (``keep_restore_sources`` is about this failure)."""
    return (f"Could not recover from checkpoint as it does not exist on storage anymore. "
            f"Got storage fs type `{fs_type}` and path: {path}")


def upload_dir(local_dir: str, fs: Any, fs_path: str) -> None:
    """Copy a local directory to ``(fs, fs_path)``, as Ray 2.60's ``persist_current_checkpoint`` does."""
    import pyarrow.fs

    fs.create_dir(fs_path)
    kwargs = {"use_threads": False} if type(fs).__name__ == "S3FileSystem" else {}  # apache/arrow#32372
    pyarrow.fs.copy_files(local_dir, fs_path, source_filesystem=pyarrow.fs.LocalFileSystem(),
                          destination_filesystem=fs, chunk_size=64 * 1024 * 1024, **kwargs)


def download_dir(fs: Any, fs_path: str, local_dir: str) -> None:
    """Copy ``(fs, fs_path)`` to a local directory; a missing one raises Tune's restore error."""
    import pyarrow.fs

    if fs.get_file_info(fs_path).type == pyarrow.fs.FileType.NotFound:
        raise ValueError(checkpoint_gone_message(fs_path, fs.type_name))
    pyarrow.fs.copy_files(fs_path, local_dir, source_filesystem=fs,
                          destination_filesystem=pyarrow.fs.LocalFileSystem())


def _is_local(fs: Any) -> bool:
    return getattr(fs, "type_name", None) == "local"


def patch_tune_driver() -> None:
    """Install the workarounds that must run where Tune's controller runs (the driver).

    Called when the proxy module is imported: the driver imports it to build
    the trainable (also under ``Tuner.restore`` and Ray Client, which unpickle
    the trainable where the controller runs). Trial processes import it too,
    where nothing would use the patches: they are skipped there, so the 16+
    trial processes of a sweep start without importing PBT and Ray Train's
    checkpoint manager. Imports no torch.
    """
    if in_worker_process():
        return
    run_trials_as_light_actors()
    keep_restore_sources()
    drop_stale_stop_on_pause()
    stop_late_pauses_of_finished_brackets()
    stop_sweep_on_setup_error()
    name_missing_metrics_of_batched_trials()


def actor_id_of(handle: Any) -> str | None:
    """The hex ID of the actor behind ``handle``, or None for anything else.

    Ray 2.60: ``ActorHandle._actor_id`` (an ``ActorID``); no public accessor
    gives it for a handle other than the caller's own.
    """
    actor_id = getattr(handle, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else None


def actor_is_dead(handle: Any) -> bool:
    """Whether Ray's control store says the actor is dead (False when it cannot tell).

    Ray 2.60: ``ray._private.state.actors(actor_id=...)["State"]`` (about 0.5 ms);
    there is no public call (``ray.get_actor`` still returns a dead named actor,
    and a probe task needs a wait). The driver asks before it gives a new trial
    to its trial server.
    """
    try:
        from ray._private import state as ray_state

        return ray_state.actors(actor_id=handle._actor_id.hex()).get("State") == "DEAD"
    except Exception:  # noqa: BLE001 - a private API: absent or changed means "not known to be dead"
        return False


def quiet_blocking_get_warning() -> None:
    """Drop Ray's "Using blocking ray.get inside async actor" warning in the trial server.

    Ray 2.60 (``_private/worker.py``, ``blocking_get_inside_async_warned``) warns
    at the first ``ray.get`` anywhere in an async actor's process, also from a
    thread of its own executor, where blocking is the point: the trial server
    runs each trial's calls on such threads and never blocks its event loop.
    """
    try:
        from ray._private import worker

        worker.blocking_get_inside_async_warned = True
    except (ImportError, AttributeError):
        pass


def on_this_node_if_driver() -> Any:
    """A scheduling strategy for the sweep's own actors (registry, trial server): on the driver's node when
    called in the driver, else ``"DEFAULT"``. They reserve nothing (``num_cpus=0``), so that node can always
    take them; a soft affinity did not hold (Ray 2.60 put 1 of 4 such actors on another node of a two-node
    test cluster).

    Why: both are created with no resources (``num_cpus=0``) and outside every placement group, so Ray put
    them on any node; losing that node then failed every trial of the sweep (the trial server) or killed
    every slot host (the registry's children), where it should cost only the trials on that node. The
    driver's node is the one whose loss ends the sweep anyway. Ray 2.60:
    ``NodeAffinitySchedulingStrategy(node_id, soft=False)``.
    """
    if in_worker_process():
        return "DEFAULT"
    try:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    except Exception:  # noqa: BLE001 - no node known (a client without one): Ray's default placement
        return "DEFAULT"


def in_worker_process() -> bool:
    """Whether this process is a Ray worker (a trial, a host), not the driver that runs Tune's controller.

    Ray 2.60: ``ray._private.worker.global_worker.mode`` is ``WORKER_MODE`` in
    worker processes; no public API says so. Unknown counts as the driver.
    """
    try:
        from ray._private import worker

        return worker.global_worker.mode == worker.WORKER_MODE
    except Exception:  # noqa: BLE001 - a private API: absent or changed means "not known to be a worker"
        return False


def experiment_dir(trainable: Any) -> str | None:
    """The experiment directory of a running trial when it is on the local disk, else the best guess.

    Ray 2.60: ``Trainable.logdir`` is the trial's working directory inside Ray's
    session staging area (``.../working_dirs/<trial>``), not the experiment
    directory; the real one is ``Trainable._storage.experiment_fs_path``.
    """
    storage = getattr(trainable, "_storage", None)
    if storage is not None and getattr(storage.storage_filesystem, "type_name", "") == "local":
        return storage.experiment_fs_path
    return os.path.dirname(trainable.logdir) if trainable.logdir else None


def quiet_setup_time_notice() -> None:
    """Drop Tune's "Trainable.setup took N seconds ... consider reuse_actors=True" notice for batched trials.

    Ray Tune 2.60 (``tune/trainable/trainable.py``, ``SETUP_TIME_THRESHOLD`` read
    right after ``setup()``): a batched trial's ``setup()`` waits for the shared
    slot host to start (torch import, ``data()``), which is no cost of the trial's
    own process, so the advice is wrong, and it appeared even with
    ``reuse_actors=True``. Called from the proxy's ``setup()``, before Tune reads it.
    """
    try:
        from ray.tune.trainable import trainable as tune_trainable

        tune_trainable.SETUP_TIME_THRESHOLD = float("inf")
    except (ImportError, AttributeError):
        pass
