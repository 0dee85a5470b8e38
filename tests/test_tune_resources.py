"""Resource requests that starve the slot host never hang a sweep (issue 11, item 6).

``tune.with_resources(trainable, {"cpu": 2})`` (kept from a script ported
from plain Tune) makes each trial process hold CPUs it never uses. On a
CPU-only cluster the host then starts without a CPU reservation; where the
host needs a GPU the trials hold, each trial fails within
``host_start_timeout_s`` with one line naming the settings to change.
"""

from __future__ import annotations

import collections

import time

import pytest
import ray
from ray import tune

from tune_helpers import alive_actors, errors, make_trainable, run_config, slow_step, wait_until


@pytest.fixture
def ray_with_gpu():
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def ray_cpus():
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()


def _fit(T, tmp_path, trials: int):
    tuner = tune.Tuner(T, param_space={"lr": tune.grid_search([0.01, 0.02][:trials])},
                       tune_config=tune.TuneConfig(metric="val_loss", mode="min", time_budget_s=120),
                       run_config=run_config(tmp_path, stop={"training_iteration": 2}))
    return tuner.fit()


def test_trials_holding_every_cpu_still_get_a_host(ray_cpus, tmp_path):
    T = make_trainable(slots_per_host=2, idle_timeout_s=3.0)
    start = time.monotonic()
    grid = _fit(tune.with_resources(T, {"cpu": 1}), tmp_path, trials=2)  # two trials hold both CPUs
    assert not errors(grid), errors(grid)
    assert all(r.metrics["training_iteration"] == 2 for r in grid)
    assert time.monotonic() - start < 100


def test_with_resources_keeps_the_trials_in_the_shared_trial_server_and_says_they_need_none(
        ray_cpus, tmp_path, caplog):
    """Tune's wrapper (a subclass overriding default_resource_request) used to run every trial in a Trainable
    process of its own: 4-5x the sweep's time, and Ray's "blocking ray.get inside async actor" once per trial."""
    from ray_modelbatch.tune import ray_compat

    T = make_trainable(slots_per_host=2, idle_timeout_s=3.0)
    wrapped = tune.with_resources(T, {"cpu": 0.25})
    assert ray_compat.batched_class(wrapped) is T and ray_compat.trial_mode(wrapped) == "shared"
    with caplog.at_level("WARNING", logger="ray_modelbatch.tune.ray_compat"):
        grid = _fit(wrapped, tmp_path, trials=2)
    assert not errors(grid), errors(grid)
    assert len({r.metrics["pid"] for r in grid}) == 1  # both trials in the one trial server process
    assert any("tune.with_resources() gives each trial" in r.getMessage() for r in caplog.records)


def test_hosts_that_would_take_every_cpu_leave_the_trials_room(ray_cpus, tmp_path):
    # num_hosts=2 with host_cpus=1 on 2 CPUs: both hosts would hold both CPUs and every trial (0.01 CPU) would
    # stay PENDING, the sweep hanging without a word. One host starts (the other is named in a warning).
    T = make_trainable(slots_per_host=2, idle_timeout_s=3.0, num_hosts=2)
    start = time.monotonic()
    grid = _fit(T, tmp_path, trials=2)
    assert not errors(grid), errors(grid)
    assert all(r.metrics["training_iteration"] == 2 for r in grid)
    assert len(T.host_stats()) == 1
    assert time.monotonic() - start < 60


def test_a_host_that_cannot_get_its_gpu_fails_the_trial_naming_the_fix(ray_with_gpu, tmp_path):
    T = make_trainable(slots_per_host=2, idle_timeout_s=3.0, host_start_timeout_s=8.0)
    start = time.monotonic()
    grid = _fit(tune.with_resources(T, {"cpu": 0.01, "gpu": 1}), tmp_path, trials=1)  # the trial holds the GPU
    (err,) = errors(grid)
    text = str(err)
    assert "no node has 1 CPU and 1 GPU free for a slot host" in text and "tune.with_resources" in text, text
    assert time.monotonic() - start < 90


def test_with_parameters_names_where_objects_go(ray_cpus, tmp_path):
    """Refused at the user's call, in the driver, once (not in every trial's setup); with no objects, allowed."""
    T = make_trainable(slots_per_host=2, idle_timeout_s=3.0)
    with pytest.raises(TypeError, match=r"\['table'\] to the trial.*batched_trainable\(data=\.\.\.\)"):
        tune.with_parameters(T, table=list(range(10)))
    grid = _fit(tune.with_parameters(T), tmp_path, trials=1)
    assert errors(grid) == []


@pytest.mark.parametrize("given, torch_first, want", [(None, False, "PASSIVE"), ("ACTIVE", False, "ACTIVE"),
                                                      (None, True, None)])
def test_the_host_sets_a_passive_openmp_policy_only_before_torch_loads(given, torch_first, want):
    """OpenMP reads OMP_WAIT_POLICY when torch loads: the host sets PASSIVE first thing, keeps a user's choice,
    and changes nothing once torch is loaded (it would only mislead)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os\n" + ("import torch\n" if torch_first else "")
            + "from ray_modelbatch.tune.host import _passive_openmp\n_passive_openmp()\n"
            "print(repr(os.environ.get('OMP_WAIT_POLICY')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == repr(want)


def test_a_thread_s_wait_for_a_core_is_read_from_linux_and_zero_elsewhere(monkeypatch):
    """``_cpu_wait_s(tid)``: that thread's run-queue wait (Linux's schedstat, second field, in ns), which only
    grows; 0 before the thread runs (no id) and where the file cannot be read (another OS, a thread gone)."""
    import builtins
    import os
    import threading

    from ray_modelbatch.tune.host import _cpu_wait_s

    me = threading.get_native_id()
    assert _cpu_wait_s(None) == 0.0
    if os.path.exists(f"/proc/self/task/{me}/schedstat"):
        first = _cpu_wait_s(me)
        sum(range(200_000))  # run a while: the wait may grow, never shrink
        with open(f"/proc/self/task/{me}/schedstat") as f:
            now = int(f.read().split()[1]) / 1e9
        assert 0 <= first <= _cpu_wait_s(me) and abs(_cpu_wait_s(me) - now) < 0.05
        # any thread's own figure, while it runs
        seen: list[float] = []
        t = threading.Thread(target=lambda: seen.append(_cpu_wait_s(threading.get_native_id())))
        t.start()
        t.join()
        assert seen and seen[0] >= 0
    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert _cpu_wait_s(me) == 0.0


def _fit_on_hosts(T, tmp_path, trials: int, concurrent: int, stop) -> tuple[list, list[dict]]:
    """``trials`` trials of ``T`` until ``stop``, at most ``concurrent`` at once: the results and every host's
    stats. No trial may fail."""
    tuner = tune.Tuner(T, param_space={"lr": tune.grid_search([0.001 * (k + 1) for k in range(trials)])},
                       tune_config=tune.TuneConfig(metric="val_loss", mode="min", time_budget_s=150,
                                                   max_concurrent_trials=concurrent),
                       run_config=run_config(tmp_path, stop=stop))
    try:
        grid = tuner.fit()
        stats = T.host_stats()
    finally:
        T.shutdown_hosts()
    assert not errors(grid), errors(grid)
    assert len(grid) == trials
    return list(grid), stats


def _sweep_on_hosts(T, tmp_path, trials: int, iterations: int, concurrent: int) -> tuple[list, list[dict], set]:
    """:func:`_fit_on_hosts` to ``iterations``, every trial reaching them; also the hosts the trials ran on."""
    grid, stats = _fit_on_hosts(T, tmp_path, trials, concurrent, {"training_iteration": iterations})
    assert all(r.metrics["training_iteration"] == iterations for r in grid)
    return grid, stats, {r.metrics["host"] for r in grid}


def test_two_hosts_share_a_cpu_node_and_its_trials(ray_cpus, tmp_path):
    # cpu_hosts_per_node=2 on a 2-CPU node: both hosts start (half a CPU reserved each, one thread each)
    # and the four trials spread over them.
    T = make_trainable(slots_per_host=2, idle_timeout_s=3.0, cpu_hosts_per_node=2)
    assert T.max_concurrent() == 4
    _, stats, hosts = _sweep_on_hosts(T, tmp_path, trials=4, iterations=2, concurrent=4)
    assert len(hosts) == 2 and len(stats) == 2 and all(s["threads"] == 1 for s in stats)


def test_auto_gives_a_cpu_node_a_second_host_once_its_steps_are_kernel_bound(ray_cpus, tmp_path):
    # cpu_hosts_per_node="auto" (the default), with every step counted as kernel-bound: after its first
    # fused steps the node's host is joined by a second one, and the later trials go to it. Each fused
    # step sleeps 10 ms, so that the sweep outlasts the second host's start.
    T = make_trainable(slots_per_host=2, idle_timeout_s=3.0, loss=None, train_step=slow_step)
    T._options["kernel_bound_step_ms"] = 0.0
    _, stats, hosts = _sweep_on_hosts(T, tmp_path, trials=16, iterations=6, concurrent=2)
    assert len(hosts) == 2, hosts
    assert stats[0]["kernel_bound"] is True and all(s["threads"] == 1 for s in stats)


def test_auto_starts_the_second_host_without_waiting_for_a_new_trial(ray_cpus, tmp_path):
    # Two trials that never end early: no trial arrives after the first two, yet the registry's watch judges
    # the host's steps and registers the second host while they train. Each trial stops once it is there.
    T = make_trainable(slots_per_host=2, idle_timeout_s=3.0, loss=None, train_step=slow_step)
    T._options["kernel_bound_step_ms"] = 0.0
    cap = 400

    def two_hosts(trial_id: str, result: dict) -> bool:
        return result["training_iteration"] >= cap or len(T.host_stats()) >= 2

    grid, stats = _fit_on_hosts(T, tmp_path, trials=2, concurrent=2, stop=two_hosts)
    assert len(stats) == 2 and stats[0]["kernel_bound"] is True
    assert all(r.metrics["training_iteration"] < cap for r in grid)  # stopped by the second host's arrival


def test_auto_splits_trials_that_come_together_over_the_node_s_two_hosts(ray_cpus, tmp_path):
    # Twice JUDGING_TRIALS trials at once, each host with room for all: the first host takes JUDGING_TRIALS while
    # it judges its steps and the second one starts, the others wait for the second host (registry._holds_back).
    from ray_modelbatch.tune.cpu_spread import JUDGING_TRIALS

    trials = 2 * JUDGING_TRIALS
    T = make_trainable(slots_per_host=trials, idle_timeout_s=3.0, loss=None, train_step=slow_step)
    T._options["kernel_bound_step_ms"] = 0.0
    grid, stats, hosts = _sweep_on_hosts(T, tmp_path, trials=trials, iterations=30, concurrent=trials)
    per_host = collections.Counter(r.metrics["host"] for r in grid)
    assert len(per_host) == 2 and min(per_host.values()) >= JUDGING_TRIALS // 2, per_host
    assert all(s["max_held"] < trials for s in stats), [s["max_held"] for s in stats]
    # the second host started on standby before the first one's verdict, not after it (registry._start_standby)
    first, second = sorted(stats, key=lambda s: s["milestones"]["init"])
    assert second["milestones"]["init"] < first["milestones"]["verdict"], (first["milestones"], second["milestones"])


@pytest.mark.parametrize("concurrent", [2, 12])
def test_auto_keeps_one_host_for_a_tiny_mlp(ray_cpus, tmp_path, concurrent):
    # With twelve trials at once, those past the first host's JUDGING_TRIALS wait for its verdict, then join it.
    T = make_trainable(slots_per_host=12, idle_timeout_s=3.0)
    _, stats, hosts = _sweep_on_hosts(T, tmp_path, trials=12, iterations=8, concurrent=concurrent)  # > 30 steps
    assert len(hosts) == 1 and len(stats) == 1 and stats[0]["kernel_bound"] is False
    # the second host that stood by for a kernel-bound verdict was stopped unused
    assert wait_until(lambda: sum(a["ActorClassName"] == "SlotHost" for a in alive_actors()) <= 1, timeout=10)


def test_a_host_takes_the_thread_count_it_is_told_on_its_engine_thread_unless_the_user_set_one(ray_cpus):
    # What a node's first host does when a second one joins it (cpu_hosts_per_node="auto"): the engine
    # thread, which runs the fused steps, sets torch's thread count itself. A host_threads= count stays.
    from ray_modelbatch.tune.host import SlotHost

    T = make_trainable(slots_per_host=2)
    told, fixed = SlotHost(T._spec_bytes, "told", 2), SlotHost(T._spec_bytes, "fixed", 2, threads=1)
    try:
        assert told.threads == 1  # a 2-CPU node: every CPU but one
        told.set_threads(2)
        fixed.set_threads(2)
        assert wait_until(lambda: told.threads == 2, timeout=10)
        time.sleep(0.5)
        assert fixed.threads == 1
    finally:
        told.shutdown()
        fixed.shutdown()
