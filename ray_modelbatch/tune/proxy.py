"""The per-trial proxy: a thin Tune ``Trainable`` that forwards to the trial's slot on a host.

Every stacked model is a real Tune trial: Tune's schedulers, searchers,
checkpointing and loggers see ordinary trials. The proxy holds no model and
imports no torch (about 108 MB per trial process instead of 230 MB); the
host does all the work. ``step()`` asks the host for K more fused steps and
returns when this trial's K steps and evaluation are done; the host keeps
stepping the other trials meanwhile.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from typing import Any

import ray
from ray.tune import Trainable
from ray.tune.execution.placement_groups import PlacementGroupFactory

from ..errors import SlotHostLostError
from .registry import get_registry

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "slot_state.pt"


class SlotTrialProxy(Trainable):
    """Base class of the trainables returned by :func:`ray_modelbatch.tune.batched_trainable`."""

    _spec_bytes: bytes = b""
    _experiment: str = ""
    _options: dict = {}

    @classmethod
    def default_resource_request(cls, config: dict) -> PlacementGroupFactory:
        return PlacementGroupFactory([dict(cls._options.get("trial_resources") or {"CPU": 0.01})])

    # ------------------------------------------------------------ lifecycle
    def setup(self, config: dict) -> None:
        self._host = None
        self._attached: str | None = None
        self._attach(config)

    def _attach(self, config: dict) -> None:
        self._skip_taken_checkpoint_dirs()
        registry = get_registry(self._spec_bytes, self._experiment, self._options)
        token = f"{self.trial_id}:{uuid.uuid4().hex[:8]}"  # this attachment; see SlotHost.attach
        self._lease = _own_handle()  # the host frees the slot when this process dies without cleanup()
        waited, warned, actor_errors = time.monotonic(), False, 0
        while True:
            try:
                got = ray.get(registry.assign.remote(token, config))
                if got is not None:
                    self._host_name, self._host = got
                    self._slot = ray.get(self._host.attach.remote(
                        self.trial_id, config, [self._lease], self._experiment_dir(), token))
                    break
            except ray.exceptions.RayActorError:
                # The registry stopped itself (idle timeout) just as this trial came, or the host
                # died between reservation and attachment: ask a new registry.
                actor_errors += 1
                if actor_errors > 5:
                    raise
                time.sleep(0.5)
                registry = get_registry(self._spec_bytes, self._experiment, self._options)
                continue
            if not warned and time.monotonic() - waited > self._options.get("oversubscribe_warn_s", 5.0):
                capacity = ray.get(registry.capacity.remote())
                logger.warning(
                    "trial %s is waiting for a free slot. Either Tune started more trials than the %d slots "
                    "of this experiment: set TuneConfig(max_concurrent_trials=<trainable>.max_concurrent()) "
                    "or wrap the searcher with ray_modelbatch.tune.FreeSlotLimiter. Or no node has a GPU (or "
                    "host_cpus CPUs) free to start a slot host on: free one, or add nodes.",
                    self.trial_id, capacity,
                )
                warned = True
            time.sleep(0.2)
        self._token = token
        self._attached = self.trial_id

    def _skip_taken_checkpoint_dirs(self) -> None:
        """Never write a checkpoint into a ``checkpoint_N`` directory that already exists.

        Works around a Ray Tune 2.60 race that batched trials hit at almost every
        synchronous PBT/PB2 perturbation (all slots report in the same fused step):
        a top trial whose pause-checkpoint is still being saved is saved a second
        time by PBT; the pause then drops the second save's future, so the
        driver's checkpoint index lags the files by one. The trial's next actor
        starts from that index and overwrites the newest checkpoint, which is the
        very one PBT told the recipients to restore (they would silently load a
        later state with the earlier iteration count).
        """
        storage = getattr(self, "_storage", None)
        if storage is None or getattr(storage, "trial_dir_name", None) is None:
            return
        try:
            import pyarrow.fs

            infos = storage.storage_filesystem.get_file_info(
                pyarrow.fs.FileSelector(storage.trial_fs_path, allow_not_found=True)
            )
        except Exception:  # noqa: BLE001 - best effort; Tune's own index is the fallback
            return
        taken = [int(m.group(1)) for i in infos if (m := re.fullmatch(r"checkpoint_(\d+)", i.base_name))]
        if taken and storage.current_checkpoint_index < max(taken):
            storage.current_checkpoint_index = max(taken)  # the next save takes max + 1

    def _experiment_dir(self) -> str | None:
        """Where the host writes its TensorBoard figures: the experiment directory when it is local.

        ``self.logdir`` is the trial's working directory inside Ray's session
        staging area (``.../working_dirs/<trial>``), not the experiment directory.
        """
        storage = getattr(self, "_storage", None)
        if storage is not None and getattr(storage.storage_filesystem, "type_name", "") == "local":
            return storage.experiment_fs_path
        return os.path.dirname(self.logdir) if self.logdir else None

    def _detach(self) -> None:
        if self._host is not None and self._attached is not None:
            try:
                ray.get(self._host.detach.remote(self._token))
            except ray.exceptions.RayActorError:
                pass  # the host is gone, and the slot with it
        self._attached = None

    def _on_host(self, method: str, *args: Any) -> Any:
        """Call the slot host; a dead host becomes an error Tune can recover the trial from."""
        try:
            return ray.get(getattr(self._host, method).remote(*args))
        except ray.exceptions.RayActorError as exc:
            self._attached = None
            raise SlotHostLostError(
                f"slot host {self._host_name} of trial {self.trial_id} died during {method}() "
                f"({type(exc).__name__}). With tune.FailureConfig(max_failures>=1), Tune restarts the trial "
                "from its last checkpoint on a new host; tune.CheckpointConfig(checkpoint_frequency=N) "
                "bounds the iterations lost."
            ) from exc

    def step(self) -> dict[str, Any]:
        return self._on_host("train", self._token)

    def save_checkpoint(self, checkpoint_dir: str) -> str:
        blob = self._on_host("save", self._token)
        with open(os.path.join(checkpoint_dir, CHECKPOINT_FILE), "wb") as f:
            f.write(blob)
        return checkpoint_dir

    def load_checkpoint(self, checkpoint: Any) -> None:
        path = checkpoint if isinstance(checkpoint, str) else checkpoint.path
        with open(os.path.join(path, CHECKPOINT_FILE), "rb") as f:
            blob = f.read()
        self._on_host("restore", self._token, blob, self.config)

    def reset_config(self, new_config: dict) -> bool:
        """Reused actor (``reuse_actors=True``): free the old trial's slot, attach the new trial."""
        self._detach()
        self._attach(new_config)
        return True

    def cleanup(self) -> None:
        self._detach()


def _own_handle() -> Any:
    """This proxy's actor handle (its lease), or None when it does not run as a Ray actor."""
    try:
        return ray.get_runtime_context().current_actor
    except RuntimeError:
        return None
