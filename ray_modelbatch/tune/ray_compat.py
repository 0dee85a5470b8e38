"""Every place the Tune layer leans on Ray internals or works around a Ray bug, in one file.

Each function names the Ray version it was written against and what to check
when Ray changes. Nothing else in ``ray_modelbatch`` reaches into
``ray._private`` or a ``Trainable``'s private attributes; when a Ray upgrade
breaks something, this file is the place to look. Imports no torch.
"""

from __future__ import annotations

import os
import re
from typing import Any

TESTED_RAY = "2.60"  # the Ray version these workarounds were written against and tested with


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
