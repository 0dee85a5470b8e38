"""A batched trial's actor without ``ray.tune``: Tune's trainable protocol, spoken by a plain Ray actor.

By default each trial's ``SlotTrialActor`` is an object in the driver's one
trial server (:mod:`~ray_modelbatch.tune.trial_server`); with
``RAY_MODELBATCH_TRIALS=process`` it is a Ray actor process of its own.

Why: a sweep of S slots runs S trial processes at once, and on a small node
starting them is most of the sweep's cost. Measured on a 2-core node (16 actors
of 0.01 CPU created at once, fresh Ray): actors that import nothing are all
ready after 6.7 s at 0.80 CPU-s each; actors that import ``ray.tune``, as every
``Trainable`` does, after 13.7 s at 1.67 CPU-s each (``import ray.tune`` pulls
in Ray Train, pandas, pyarrow and Ray Data). A batched trial needs none of it:
its model lives on the slot host, and all it does is forward Tune's calls.

Tune's controller (Ray 2.60) calls these methods on a trial's actor:
``train``, ``save``, ``restore``, ``reset``, ``stop``, ``export_model``,
``get_auto_filled_metrics`` and ``get_current_ip_pid``. This class implements
them as ``Trainable`` does, over :class:`~ray_modelbatch.tune.slot_client.SlotClient`,
with plain data in and out: the driver's side (``ray_compat.run_trials_as_light_actors``)
turns Tune's objects (the trial's ``StorageContext`` and ``_TrialInfo``, a
checkpoint's ``_TrainingResult``) into dicts before they are sent, and a
saved checkpoint comes back as an object that unpickles, in the driver, into
Ray's own ``_TrainingResult``. Results carry the same keys as ``Trainable``'s.

Checkpoints go where ``Trainable`` puts them: ``<trial dir>/checkpoint_<index>``
on the trial's storage. On the local filesystem (the default) the files are
written in place; on any other (``s3://``, a custom pyarrow filesystem) they are
staged in a temporary directory and copied with ``pyarrow.fs``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime
from typing import Any

import ray

from . import ray_compat
from .slot_client import SlotClient

# ray.tune.result.DEBUG_METRICS (Ray 2.60): what Tune asks of a trial before its first result
_DEBUG_METRICS = ("trial_id", "experiment_id", "date", "timestamp", "pid", "hostname", "node_ip", "config")


class SlotTrialActor(SlotClient):
    """What runs in a batched trial's process when the driver has ``run_trials_as_light_actors`` installed."""

    def __init__(self, config: dict, trial: dict, storage: dict | None = None) -> None:
        self._log_files: list = []
        self._start(config, trial, storage)
        self.setup(dict(self.config))

    def _start(self, config: dict, trial: dict, storage: dict | None) -> None:
        """Take a trial's config, identity and storage, as ``Trainable.__init__`` and ``reset`` do."""
        self.config = dict(config or {})
        self._trial = trial
        self._storage = storage
        self._index = storage["checkpoint_index"] if storage else -1  # the last checkpoint index used
        self._iteration = 0
        self._time_total = 0.0
        self._timesteps_total: float | None = None
        self._episodes_total: float | None = None
        self._time_since_restore = 0.0
        self._timesteps_since_restore = 0
        self._iterations_since_restore = 0
        self._last_result: dict | None = None
        self._local_ip = ray.util.get_node_ip_address()
        self._open_log_files(trial.get("stdout_file"), trial.get("stderr_file"))

    @property
    def trial_id(self) -> str:
        return self._trial["trial_id"]

    @property
    def trial_name(self) -> str:
        return self._trial.get("trial_name", self.trial_id)

    # ------------------------------------------------------------ what SlotClient asks of its subclass
    def _experiment_dir(self) -> str | None:
        if self._storage and self._storage["filesystem"] is None:
            return self._storage["experiment_fs_path"]
        return os.path.dirname(self._storage["working_dir"]) if self._storage else None  # as Trainable.logdir's

    def _skip_taken_checkpoints(self) -> None:
        if self._storage:
            taken = ray_compat.taken_checkpoint_index(self._storage["filesystem"], self._storage["trial_fs_path"])
            if taken is not None and taken > self._index:
                self._index = taken  # the next save takes taken + 1 (ray_compat.skip_taken_checkpoint_dirs)

    # ------------------------------------------------------------ Tune's protocol
    def train(self) -> dict:
        """One iteration, with the keys ``Trainable.train`` fills in."""
        start = time.time()
        return self._finish(dict(self.step()), start)

    async def train_async(self) -> dict:
        """:meth:`train` for an asyncio caller (the trial server): the host's answer is awaited, no thread waits."""
        start = time.time()
        return self._finish(dict(await self.step_async()), start)

    def _finish(self, result: dict, start: float) -> dict:
        """Count the iteration and fill in the keys ``Trainable.train`` adds to a step's result."""
        self._iteration += 1
        self._iterations_since_restore += 1
        took = result.get("time_this_iter_s")
        took = time.time() - start if took is None else took
        self._time_total += took
        self._time_since_restore += took
        result.setdefault("done", False)
        if result.get("timesteps_this_iter") is not None:
            self._timesteps_total = (self._timesteps_total or 0) + result["timesteps_this_iter"]
            self._timesteps_since_restore += result["timesteps_this_iter"]
        if result.get("episodes_this_iter") is not None:
            self._episodes_total = (self._episodes_total or 0) + result["episodes_this_iter"]
        if self._timesteps_total is not None:
            result.setdefault("timesteps_total", self._timesteps_total)
        if self._episodes_total is not None:
            result.setdefault("episodes_total", self._episodes_total)
        result.setdefault("training_iteration", self._iteration)
        result.update(self.get_auto_filled_metrics(time_this_iter=took, timestamp=result.get("timestamp")))
        self._flush_log_files()
        self._last_result = result
        return result

    def get_auto_filled_metrics(self, now: datetime | None = None, time_this_iter: float | None = None,
                                timestamp: int | None = None, debug_metrics_only: bool = False) -> dict:
        now = now or datetime.today()
        filled = {
            "trial_id": self.trial_id,
            "date": now.strftime("%Y-%m-%d_%H-%M-%S"),
            "timestamp": timestamp if timestamp else int(time.mktime(now.timetuple())),
            "time_this_iter_s": time_this_iter,
            "time_total_s": self._time_total,
            "pid": os.getpid(),
            "hostname": platform.node(),
            "node_ip": self._local_ip,
            "config": self.config,
            "time_since_restore": self._time_since_restore,
            "iterations_since_restore": self._iterations_since_restore,
        }
        if self._timesteps_since_restore:
            filled["timesteps_since_restore"] = self._timesteps_since_restore
        if debug_metrics_only:
            filled = {k: v for k, v in filled.items() if k in _DEBUG_METRICS}
        return filled

    def get_current_ip_pid(self) -> tuple[str, int]:
        return self._local_ip, os.getpid()

    def save(self, checkpoint_dir: str | None = None) -> Any:
        """Write the slot's checkpoint into the trial's next ``checkpoint_<index>``.

        The driver receives Ray Train's ``_TrainingResult`` (see ``ray_compat.SavedCheckpoint``).
        """
        metrics = dict(self._last_result or {})
        if not self._storage:  # an actor made outside Tune: like Trainable, a local directory
            path = checkpoint_dir or tempfile.mkdtemp(prefix="checkpoint_")
            os.makedirs(path, exist_ok=True)
            self.save_checkpoint(path)
            return ray_compat.SavedCheckpoint(path, None, metrics)
        fs, self._index = self._storage["filesystem"], self._index + 1
        path = f"{self._storage['trial_fs_path']}/{ray_compat.checkpoint_dir_name(self._index)}"
        if fs is None:
            if not os.path.exists(self._storage["validation_file"]):
                raise RuntimeError(ray_compat.storage_not_shared_message(self._storage["experiment_fs_path"]))
            os.makedirs(path, exist_ok=True)
            self.save_checkpoint(path)
        else:
            staged = tempfile.mkdtemp(prefix="checkpoint_")
            try:
                self.save_checkpoint(staged)
                ray_compat.upload_dir(staged, fs, path)
            finally:
                shutil.rmtree(staged, ignore_errors=True)
        return ray_compat.SavedCheckpoint(path, fs, metrics)

    def restore(self, checkpoint: dict) -> None:
        """Load a checkpoint the driver described as ``{"path", "filesystem", "metrics"}``."""
        metrics = checkpoint.get("metrics") or {}
        self._iteration = metrics.get("training_iteration", 0)
        self._time_total = metrics.get("time_total_s", 0)
        self._time_since_restore = 0.0
        self._iterations_since_restore = 0
        self._timesteps_total = metrics.get("timesteps_total")
        self._timesteps_since_restore = 0
        self._episodes_total = metrics.get("episodes_total")
        path, fs = checkpoint["path"], checkpoint.get("filesystem")
        if fs is None:
            if not os.path.isdir(path):
                raise ValueError(ray_compat.checkpoint_gone_message(path, "local"))
            self.load_checkpoint(path)
        else:
            staged = tempfile.mkdtemp(prefix="restore_")
            try:
                ray_compat.download_dir(fs, path, staged)  # raises the same ValueError when it is gone
                self.load_checkpoint(staged)
            finally:
                shutil.rmtree(staged, ignore_errors=True)

    def reset(self, new_config: dict, trial: dict | None = None, storage: dict | None = None) -> bool:
        """A reused actor takes a new trial (``reuse_actors=True``), as ``Trainable.reset`` does."""
        self._close_log_files()
        self._start(new_config, trial or self._trial, storage)
        return self.reset_config(dict(self.config))

    def stop(self) -> None:
        self.cleanup()
        self._close_log_files()

    def export_model(self, export_formats: Any, export_dir: str | None = None) -> dict:
        return {}  # Trainable's default: a batched trial's model is exported with trainable.load_model()

    # ------------------------------------------------------------ RunConfig(log_to_file=...)
    def _open_log_files(self, stdout_file: str | None, stderr_file: str | None) -> None:
        """Copy this process's output to the trial's log files, as ``Trainable`` does (relative to its working dir)."""
        for name, stream, redirect in ((stdout_file, sys.stdout, contextlib.redirect_stdout),
                                       (stderr_file, sys.stderr, contextlib.redirect_stderr)):
            if not name:
                continue
            fp = open(self._log_path(name), "a+")
            tee = _Tee(stream, fp)
            context = redirect(tee)
            context.__enter__()
            self._log_files.append((context, tee, fp))

    def _log_path(self, name: str) -> str:
        """Where log file ``name`` goes (relative to the trial's working directory, as ``Trainable`` puts it)."""
        base = self._storage["working_dir"] if self._storage else os.getcwd()
        path = os.path.expanduser(os.path.join(base, name))
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        return path

    def _flush_log_files(self) -> None:
        for _, tee, _ in self._log_files:
            tee.flush()

    def _close_log_files(self) -> None:
        while self._log_files:
            context, tee, fp = self._log_files.pop()
            tee.flush()
            context.__exit__(None, None, None)
            fp.close()


class _Tee:
    """Writes to two streams (the worker's own, which Ray forwards to the driver, and the trial's log file)."""

    def __init__(self, *streams: Any) -> None:
        self._streams = streams

    def write(self, text: str) -> int:
        for s in self._streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self._streams:
            with contextlib.suppress(Exception):
                s.flush()

    def isatty(self) -> bool:
        return False
