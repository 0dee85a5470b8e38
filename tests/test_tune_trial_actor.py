"""Where a batched trial's actor runs: the shared trial server, a light process, or the classic ``Trainable``.

Tune's driver runs a batched trial's actor without ``ray.tune`` in it
(``ray_compat.run_trials_as_light_actors``): by default as an object in the
driver's one trial server (``trial_server``), else (``RAY_MODELBATCH_TRIALS=process``)
as a light actor process of its own. These tests check which one runs, that Tune
sees the same results, keys and checkpoints from each as from the classic proxy,
that checkpoints also travel through a filesystem that is not the local disk,
and that trials survive the death of the shared server.
"""

from __future__ import annotations

import glob
import os
import signal

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
                                         "log_to_file": "trial.log", **run_kw})
    assert h.errors(grid) == []
    return grid, log, maps


def _log_files(name):
    return glob.glob(os.path.join(ray._private.worker._global_node.get_session_dir_path(),
                                  "artifacts", "*", name, "working_dirs", "*", "trial.log"))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/<pid>/maps (Linux)")
def test_shared_and_light_trials_skip_ray_tune_and_match_the_classic_proxy(trainables, tmp_path, monkeypatch):
    runs = {}
    for mode in ("shared", "process", "classic"):
        monkeypatch.setenv("RAY_MODELBATCH_TRIALS", mode)
        T = trainables(slots_per_host=2)
        runs[mode] = (*_sweep(T, tmp_path, mode), T.host_stats()[0]["pid"])

    shared_maps, process_maps, classic_maps = (runs[m][2] for m in ("shared", "process", "classic"))
    # shared: one host, which holds both trials' objects: they report the host's process (the trial server's
    # objects are the same class: test_trials_survive_the_shared_trial_server_dying runs a sweep there)
    assert set(shared_maps.seen) == {runs["shared"][3]} and not any(shared_maps.seen.values()), shared_maps.seen
    assert len(process_maps.seen) == 2 and not any(process_maps.seen.values()), process_maps.seen
    assert classic_maps.seen and all(classic_maps.seen.values()), classic_maps.seen  # the check can fail
    # after fit() the server's process ends (its trials were stopped, or killed by Tune's cleanup)
    assert h.wait_until(lambda: not [a for a in h.alive_actors() if a["ActorClassName"] == "TrialServer"],
                        timeout=20), h.alive_actors()

    by_lr = lambda grid: {r.config["lr"]: r for r in grid}  # noqa: E731
    classic, classic_log = runs["classic"][:2]
    for mode in ("shared", "process"):
        grid, log = runs[mode][:2]
        for lr in (0.05, 0.02):
            a, b = log.rows(by_lr(grid)[lr]), classic_log.rows(by_lr(classic)[lr])
            assert [sorted(r) for r in a] == [sorted(r) for r in b]  # the same keys as Trainable fills in
            assert [{k: v for k, v in r.items() if k not in VOLATILE} for r in a] == \
                   [{k: v for k, v in r.items() if k not in VOLATILE} for r in b]
            ca, cb = by_lr(grid)[lr].checkpoint, by_lr(classic)[lr].checkpoint
            assert os.path.basename(ca.path) == os.path.basename(cb.path) == "checkpoint_000002"
            assert type(ca) is type(cb) and type(ca.filesystem) is type(cb.filesystem)
            sa, sb = h.load_slot_state(ca.path), h.load_slot_state(cb.path)
            for k, v in sa["model"].items():
                assert torch.equal(v, sb["model"][k]), k
            assert sa["optimizer"]["steps"] == sb["optimizer"]["steps"] == 3 * K
        # RunConfig(log_to_file=...): a file per trial in its working directory, as Trainable writes it
        assert len(_log_files(mode)) == 2, (mode, _log_files(mode))


class KillServerAt(tune.Callback):
    """SIGKILLs the shared trial server (the process every result names) at the first result of iteration ``at``."""

    def __init__(self, at):
        self.at, self.killed = at, None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.killed is None and result["training_iteration"] == self.at:
            self.killed = result["pid"]
            os.kill(self.killed, signal.SIGKILL)


def _sweep_killing_the_reporting_process(T, tmp_path):
    """Three trials of 4 iterations, checkpointed every iteration, that may fail once; the process their
    results name is SIGKILLed at the first result of iteration 2. Every trial ends without an error."""
    kill = KillServerAt(at=2)
    grid, log = h.fit(T, {"lr": tune.grid_search([0.05, 0.03, 0.02])}, tmp_path,
                      run_kw={"stop": {"training_iteration": 4}, "callbacks": [kill],
                              "checkpoint_config": tune.CheckpointConfig(checkpoint_frequency=1),
                              "failure_config": tune.FailureConfig(max_failures=1)})
    assert kill.killed is not None
    assert h.errors(grid) == [] and len(grid) == 3
    return kill, grid, log


def test_trials_survive_the_shared_trial_server_dying(trainables, tmp_path, monkeypatch):
    """The server's death fails every trial it held, as their processes' deaths would: the host frees their
    slots by the lease, Tune restarts each from its checkpoint (``FailureConfig``) on a new server, and every
    trial still trains exactly its steps."""
    monkeypatch.setenv("RAY_MODELBATCH_TRIALS", "server")  # by default the sweep's one host holds the trials
    T = trainables(slots_per_host=3, lease_check_s=0.5)
    kill, grid, log = _sweep_killing_the_reporting_process(T, tmp_path)
    for r in grid:
        rows = log.rows(r)
        assert r.metrics["training_iteration"] == 4 and r.metrics["slot_steps"] == 4 * K
        assert any(x["pid"] != kill.killed for x in rows)  # it went on in a new server
    new_pids = {x["pid"] for r in grid for x in log.rows(r)} - {kill.killed}
    assert len(new_pids) == 1, new_pids  # one new server for all restarted trials
    assert h.wait_until(lambda: sum(s["attached"] + s["reserved"] for s in T.host_stats()) == 0, timeout=15)
    assert sum(s["freed_by_lease"] for s in T.host_stats()) >= 1  # the dead server's trials' slots


def test_trials_held_by_their_host_survive_its_death(trainables, tmp_path):
    """A sweep with one host has the host hold its trials' objects, so the host's death fails them all (their
    slots die with it anyway): Tune restarts each from its checkpoint (``FailureConfig``), now in a trial
    server, with its slot on a host the registry starts anew, and every trial still trains exactly its steps."""
    T = trainables(slots_per_host=3, lease_check_s=0.5)
    kill, grid, log = _sweep_killing_the_reporting_process(T, tmp_path)  # the host, which every result names
    [stats] = T.host_stats()  # the new host: the first died
    assert stats["pid"] != kill.killed
    for r in grid:
        assert r.metrics["training_iteration"] == 4 and r.metrics["slot_steps"] == 4 * K
    pids = {x["pid"] for r in grid for x in log.rows(r)}
    assert kill.killed in pids  # the first host held them (a trial may not have reported before it died)
    new_pids = pids - {kill.killed}
    assert len(new_pids) == 1 and stats["pid"] not in new_pids, new_pids  # one trial server for the restarted


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



@pytest.mark.parametrize("held_by", ["server", "host"])
def test_shared_trial_handles_keep_order_fail_alone_and_end_by_kill(trainables, held_by):
    """Handles made as Tune's actor manager makes them, on the trial server or (after the driver's prestart
    planned one host) on the host: a trial's calls run in order; a trial whose constructor failed raises that
    error on every call while another trial trains on; ``ray.kill``'s route (``handle.kill()``) frees the slot
    at once; ``ray.kill`` of real actors still goes to Ray."""
    from ray.air.execution._internal.actor_manager import RayActorManager

    from ray_modelbatch.tune import shared_trials
    from ray_modelbatch.tune.shared_trials import SharedTrialClass, forget_trial_server

    T = trainables(slots_per_host=2)
    if held_by == "host":
        T.default_resource_request({"lr": 0.05, "seed": 3})  # Tune's first ask: the prestart
    cls = SharedTrialClass.of(T).options(num_cpus=0.01, scheduling_strategy=None)  # what Tune passes is ignored
    try:
        good = cls.remote(config={"lr": 0.05, "seed": 3}, trial={"trial_id": "good"})
        bad = cls.remote(config={"seed": 4}, trial={"trial_id": "bad"})  # hparams() reads config["lr"]
        assert good._on_host is bad._on_host is (held_by == "host")
        assert ray.get(good.__ray_ready__.remote()) is True
        ip_pid = ray.get(good.get_current_ip_pid.remote())
        assert (ip_pid[1] == T.host_stats()[0]["pid"]) is (held_by == "host")
        assert shared_trials._host_live[0] == (2 if held_by == "host" else 0)
        # the constructor's own call never raises: the driver drops its reference, and Ray prints an error
        # in a dropped reference again as an "Unhandled error" traceback (one more per failed trial)
        assert ray.get(bad._started) is None
        with pytest.raises(ray.exceptions.RayTaskError, match="has no key 'lr'"):
            ray.get(bad.__ray_ready__.remote())
        with pytest.raises(ray.exceptions.RayTaskError, match="has no key 'lr'"):
            ray.get(bad.train.remote())
        # four calls submitted at once run in their order: iterations 1, 2, 3 and then the metrics of 3
        refs = [good.train.remote() for _ in range(3)] + [good.get_auto_filled_metrics.remote(debug_metrics_only=True)]
        results = ray.get(refs)
        assert [r["training_iteration"] for r in results[:3]] == [1, 2, 3]
        assert [r["slot_steps"] for r in results[:3]] == [K, 2 * K, 3 * K]
        assert results[3]["trial_id"] == "good" and "time_total_s" not in results[3]
        assert T.host_stats()[0]["attached"] == 1

        # Tune's actor manager kills a trial it gave up waiting on: the shared handle ends in the server
        class Manager:  # the attributes RayActorManager._try_kill_actor uses
            def __init__(self, handle):
                self._live_actors_to_ray_actors_resources = {"tracked": (handle, None)}
                self._live_actors_to_kill = {"tracked"}
                self.stopped = []

            def _cleanup_actor_futures(self, tracked):
                self.stopped.append(("futures", tracked))

            def _actor_stop_resolved(self, tracked):
                self.stopped.append(("stopped", tracked))

        manager = Manager(good)
        assert RayActorManager._try_kill_actor(manager) is True
        assert manager.stopped == [("futures", "tracked"), ("stopped", "tracked")]
        assert h.wait_until(lambda: T.host_stats()[0]["attached"] == 0, timeout=10)
        with pytest.raises(ray.exceptions.RayTaskError, match="has ended"):
            ray.get(good.train.remote())
        assert shared_trials._host_live[0] == (1 if held_by == "host" else 0)  # bad's handle lives on
    finally:
        forget_trial_server()


def test_trials_beyond_what_the_host_holds_go_to_a_trial_server(trainables, monkeypatch):
    """The host holds at most ``HOST_TRIALS_MAX`` trials' objects at once (each call takes one of its Ray
    threads); the next ones go to a trial server, and an ended trial gives its place back."""
    from ray_modelbatch.tune import shared_trials
    from ray_modelbatch.tune.shared_trials import SharedTrialClass, forget_trial_server

    monkeypatch.setattr(shared_trials, "HOST_TRIALS_MAX", 1)
    T = trainables(slots_per_host=2)
    T.default_resource_request({"lr": 0.05, "seed": 3})
    cls = SharedTrialClass.of(T)
    try:
        a = cls.remote(config={"lr": 0.05, "seed": 3}, trial={"trial_id": "a"})
        b = cls.remote(config={"lr": 0.02, "seed": 4}, trial={"trial_id": "b"})
        assert a._on_host and not b._on_host
        ra, rb = ray.get([a.train.remote(), b.train.remote()])
        assert ra["pid"] == T.host_stats()[0]["pid"] != rb["pid"]
        assert ra["slot_steps"] == rb["slot_steps"] == K
        assert ray.get(a.stop.remote()) is None and shared_trials._host_live[0] == 0
        c = cls.remote(config={"lr": 0.03, "seed": 5}, trial={"trial_id": "c"})
        assert c._on_host and ray.get(c.train.remote())["training_iteration"] == 1
    finally:
        forget_trial_server()


def test_trial_mode_follows_the_environment_once_per_class(monkeypatch, caplog):
    def fresh():
        return type("T", (), {"_spec_bytes": b"spec"})

    assert ray_compat.trial_mode(fresh()) == "shared"  # the default
    monkeypatch.setenv("RAY_MODELBATCH_TRIALS", "process")
    T = fresh()
    assert ray_compat.trial_mode(T) == "process"
    monkeypatch.setenv("RAY_MODELBATCH_TRIALS", "classic")
    assert ray_compat.trial_mode(T) == "process"  # decided once: every trial of a sweep gets the same kind
    assert ray_compat.trial_mode(fresh()) == "classic" and not ray_compat.is_light(fresh())
    assert ray_compat.trial_mode(type("Sub", (T,), {})) == "classic"  # a subclass's overrides need a Trainable
    monkeypatch.delenv("RAY_MODELBATCH_TRIALS")
    monkeypatch.setenv("RAY_MODELBATCH_LIGHT_TRIALS", "0")  # the older switch
    assert ray_compat.trial_mode(fresh()) == "classic"
    monkeypatch.setenv("RAY_MODELBATCH_TRIALS", "bogus")
    with caplog.at_level("WARNING"):
        assert ray_compat.trial_mode(fresh()) == "shared"
    assert "RAY_MODELBATCH_TRIALS='bogus' is not one of shared, server, process, classic" in caplog.text


def test_a_shared_trial_trains_like_its_model_alone_under_its_seed(trainables, tmp_path):
    """The host seeds a trial's model as ``torch.manual_seed(config["seed"])`` then ``model(config)`` would
    (on a CPU host through the CPU generator alone, see ``host._seed_model_init``) and feeds it the slot stream
    ``SlotSampler(train rows, batch_size, seed)``: its checkpoint after one iteration equals that model trained
    alone with ``torch.optim.Adam`` on the same batches."""
    import torch.nn.functional as F

    from ray_modelbatch.data import SlotSampler

    T = trainables(slots_per_host=2)
    config = {"lr": 0.02, "seed": 7}
    grid, _ = h.fit(T, {"lr": tune.grid_search([config["lr"]]), "seed": tune.grid_search([config["seed"]])},
                    tmp_path, run_kw={"stop": {"training_iteration": 1},
                                      "checkpoint_config": tune.CheckpointConfig(checkpoint_frequency=1)})
    assert h.errors(grid) == []
    fused = h.load_slot_state(grid[0].checkpoint.path)["model"]

    x, y, _, _ = h.digits()
    torch.manual_seed(config["seed"])
    model = h.make_model(config)
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    stream = SlotSampler(torch.arange(x.shape[0]), 32, config["seed"])
    for _ in range(K):
        rows = next(stream)
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
    for name, p in model.state_dict().items():
        torch.testing.assert_close(fused[name], p, rtol=1e-5, atol=1e-6)


def test_a_shared_trial_whose_host_dies_fails_in_one_line_and_another_server_trial_is_unharmed(trainables):
    """A shared trial's iterations are awaited on the server's event loop (``SlotTrialActor.train_async``): when
    its host dies, the next one fails with ``SlotHostLostError``'s message (which Tune's ``FailureConfig``
    recovers from), and a trial on another host of the same server keeps training."""
    from ray_modelbatch.tune.shared_trials import SharedTrialClass, forget_trial_server

    doomed_T, other_T = trainables(slots_per_host=1), trainables(slots_per_host=1)
    try:
        doomed = SharedTrialClass.of(doomed_T).remote(config={"lr": 0.05, "seed": 3}, trial={"trial_id": "doomed"})
        other = SharedTrialClass.of(other_T).remote(config={"lr": 0.05, "seed": 4}, trial={"trial_id": "other"})
        assert ray.get([doomed.train.remote(), other.train.remote()])[0]["training_iteration"] == 1
        [stats] = doomed_T.host_stats()
        os.kill(stats["pid"], signal.SIGKILL)
        with pytest.raises(ray.exceptions.RayTaskError, match=r"slot host \S+ of trial doomed died during train\(\)"):
            ray.get(doomed.train.remote())
        assert ray.get(other.train.remote())["training_iteration"] == 2
    finally:
        forget_trial_server()
