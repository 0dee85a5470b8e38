"""The light trial actor (``trial_actor.SlotTrialActor``) against the classic ``Trainable`` proxy.

Tune's driver runs a batched trial as a plain Ray actor that never imports
``ray.tune`` (``ray_compat.run_trials_as_light_actors``). These tests check that
it is the light actor that runs, that Tune sees the same results, keys and
checkpoints as from the classic proxy, and that checkpoints also travel through
a filesystem that is not the local disk.
"""

from __future__ import annotations

import glob
import os

import pyarrow.fs
import pytest
import ray
import torch
from ray import tune
from ray.train._internal.session import _TrainingResult

import tune_helpers as h
from ray_modelbatch.tune import ray_compat
from tune_helpers import K, ray_session, trainables  # noqa: F401 - shared fixtures

# Keys whose values differ between any two runs (clocks, processes, IDs and paths; the host and slot it got).
VOLATILE = {"time_this_iter_s", "time_total_s", "time_since_restore", "date", "timestamp", "pid", "hostname",
            "node_ip", "trial_id", "experiment_tag", "checkpoint_dir_name", "config", "host", "slot"}


class MapsPandas(tune.Callback):
    """At each result, whether the reporting trial's process has pandas' libraries mapped (``import ray.tune``
    loads pandas; Ray itself loads pyarrow in every worker that deserializes an argument, so that tells nothing)."""

    def __init__(self):
        self.seen: dict[int, bool] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        pid = result["pid"]
        if pid not in self.seen:
            with open(f"/proc/{pid}/maps") as f:
                self.seen[pid] = "/pandas/" in f.read()


def _sweep(T, tmp_path, name, **run_kw):
    maps = MapsPandas()
    grid, log = h.fit(T, {"lr": tune.grid_search([0.05, 0.02]), "seed": tune.grid_search([3])}, tmp_path,
                      name=name, run_kw={"stop": {"training_iteration": 3}, "callbacks": [maps],
                                         "checkpoint_config": tune.CheckpointConfig(checkpoint_frequency=1),
                                         **run_kw})
    assert h.errors(grid) == []
    return grid, log, maps


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/<pid>/maps (Linux)")
def test_light_trials_skip_ray_tune_and_match_the_classic_proxy(trainables, tmp_path, monkeypatch):
    light, light_log, light_maps = _sweep(trainables(slots_per_host=2), tmp_path, "light", log_to_file="trial.log")
    monkeypatch.setenv("RAY_MODELBATCH_LIGHT_TRIALS", "0")
    classic, classic_log, classic_maps = _sweep(trainables(slots_per_host=2), tmp_path, "classic")

    assert light_maps.seen and not any(light_maps.seen.values()), light_maps.seen  # no ray.tune in a light trial
    assert classic_maps.seen and all(classic_maps.seen.values()), classic_maps.seen  # the check can fail

    by_lr = lambda grid: {r.config["lr"]: r for r in grid}  # noqa: E731
    light_by, classic_by = by_lr(light), by_lr(classic)
    for lr in (0.05, 0.02):
        a, b = light_log.rows(light_by[lr]), classic_log.rows(classic_by[lr])
        assert [sorted(r) for r in a] == [sorted(r) for r in b]  # the same keys as Trainable fills in
        assert [{k: v for k, v in r.items() if k not in VOLATILE} for r in a] == \
               [{k: v for k, v in r.items() if k not in VOLATILE} for r in b]
        ca, cb = light_by[lr].checkpoint, classic_by[lr].checkpoint
        assert os.path.basename(ca.path) == os.path.basename(cb.path) == "checkpoint_000002"
        assert type(ca) is type(cb) and type(ca.filesystem) is type(cb.filesystem)
        sa, sb = h.load_slot_state(ca.path), h.load_slot_state(cb.path)
        for k, v in sa["model"].items():
            assert torch.equal(v, sb["model"][k]), k
        assert sa["optimizer"]["steps"] == sb["optimizer"]["steps"] == 3 * K
    # RunConfig(log_to_file=...): a file per trial in its working directory, as Trainable writes it
    logs = glob.glob(os.path.join(ray._private.worker._global_node.get_session_dir_path(),
                                  "artifacts", "*", "light", "working_dirs", "*", "trial.log"))
    assert len(logs) == 2, logs


def test_light_trial_checkpoints_through_another_filesystem(trainables, tmp_path):
    """A storage filesystem that is not the local disk: checkpoints are staged and copied with pyarrow.fs."""
    T = trainables(slots_per_host=2)
    fs = pyarrow.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pyarrow.fs.LocalFileSystem())
    os.makedirs(tmp_path / "bucket")
    grid, log = h.fit(T, {"lr": tune.grid_search([0.05]), "seed": tune.grid_search([3])}, tmp_path, name="sub",
                      run_kw={"stop": {"training_iteration": 2}, "storage_filesystem": fs,
                              "checkpoint_config": tune.CheckpointConfig(checkpoint_frequency=1)})
    assert h.errors(grid) == []
    [r] = grid
    assert isinstance(r.checkpoint.filesystem, pyarrow.fs.SubTreeFileSystem)
    real = lambda fs_path: os.path.join(tmp_path, "bucket", fs_path.lstrip("/"))  # noqa: E731
    saved = h.load_slot_state(real(r.checkpoint.path))
    assert saved["optimizer"]["steps"] == 2 * K

    # A fresh light actor outside Tune restores it (downloaded), trains on, and saves again (uploaded).
    trial_dir = os.path.dirname(r.checkpoint.path)
    storage = {"filesystem": fs, "trial_fs_path": trial_dir, "experiment_fs_path": os.path.dirname(trial_dir),
               "validation_file": "", "checkpoint_index": -1, "working_dir": str(tmp_path / "work" / "manual")}
    actor = ray.remote(ray_compat.light_actor_class(T)).options(num_cpus=0.01).remote(
        config={"lr": 0.05, "seed": 3}, trial={"trial_id": "manual"}, storage=storage)
    tune_sends = _TrainingResult(checkpoint=r.checkpoint, metrics=r.metrics)  # what Tune restores from
    ray.get(actor.restore.remote(ray_compat.light_checkpoint(tune_sends)))
    res = ray.get(actor.train.remote())
    assert res["training_iteration"] == 3 and res["slot_steps"] == 3 * K
    assert res["val_loss"] == pytest.approx(_iteration_3(T, tmp_path)["val_loss"], rel=1e-6)
    again = ray.get(actor.save.remote())
    assert type(again).__name__ == "_TrainingResult" and again.metrics["training_iteration"] == 3
    assert os.path.basename(again.checkpoint.path) == "checkpoint_000002"  # after the sweep's 000000 and 000001
    assert h.load_slot_state(real(again.checkpoint.path))["optimizer"]["steps"] == 3 * K
    ray.get(actor.stop.remote())
    ray.kill(actor)

    gone = dict(ray_compat.light_checkpoint(r.checkpoint), path=r.checkpoint.path + "_gone")
    actor = ray.remote(ray_compat.light_actor_class(T)).options(num_cpus=0.01).remote(
        config={"lr": 0.05, "seed": 3}, trial={"trial_id": "manual2"}, storage=storage)
    with pytest.raises(ray.exceptions.RayTaskError, match="does not exist on storage anymore"):
        ray.get(actor.restore.remote(gone))
    ray.kill(actor)


def _iteration_3(T, tmp_path):
    """The same trial's third result, trained without a restore in between (on the local disk)."""
    grid, log = h.fit(T, {"lr": tune.grid_search([0.05]), "seed": tune.grid_search([3])}, tmp_path, name="ref",
                      run_kw={"stop": {"training_iteration": 3}})
    return log.rows(grid[0])[-1]

