"""Surviving sweeps with real Ray: host lifetime, a host crash, an interrupted driver.

Every survival check compares with an undisturbed run of the same sweep
(``reference``): a trial that recovered must end with the same metrics, and
a trial that was not touched must have every iteration exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler

import tune_helpers as h
from tune_helpers import K, ray_session  # noqa: F401 - shared fixture

HERE = os.path.dirname(os.path.abspath(__file__))
ITERS = h.SURVIVE_ITERS


def gone(T) -> bool:
    """Neither the experiment's registry nor any of its hosts is alive."""
    return not h.alive_named(f"ray_modelbatch:{T._experiment}:")


def survive_fit(tmp_path, name, callbacks=(), T=None):
    T = T or h.make_trainable(**h.SURVIVE_TRAINABLE)
    log = h.ResultLog()
    kw = h.survive_run_kw()
    tuner = tune.Tuner(T, param_space=h.SURVIVE_SPACE, tune_config=h.tune_config(T, scheduler=FIFOScheduler()),
                       run_config=h.run_config(tmp_path, name=name, callbacks=[log, *callbacks], **kw))
    return T, tuner.fit(), log


@pytest.fixture(scope="module")
def reference(ray_session, tmp_path_factory):
    """Final val_loss per lr of the undisturbed sweep."""
    T, grid, _ = survive_fit(tmp_path_factory.mktemp("reference"), "reference")
    T.shutdown_hosts()
    assert h.errors(grid) == []
    return {r.config["lr"]: r.metrics["val_loss"] for r in grid}


def check_against_reference(grid, reference):
    assert h.errors(grid) == [] and len(grid) == len(reference)
    for r in grid:
        assert r.metrics["training_iteration"] == ITERS
        assert r.metrics["slot_steps"] == ITERS * K
        assert r.metrics["val_loss"] == pytest.approx(reference[r.config["lr"]], rel=1e-4), r.config


def driver(tmp_path, name, pause):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "sweep_driver.py"), address, str(tmp_path), name,
                             str(pause)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    info = {}
    for line in proc.stdout:
        key, _, value = line.strip().partition(" ")
        if key in ("JOB", "EXP"):
            info[key] = value
        if key == "RESULT" and int(value) >= 12:  # the sweep is in full swing
            return proc, info
    proc.wait(timeout=30)
    raise AssertionError(f"the driver ended before the sweep got going (rc {proc.returncode})")


# ------------------------------------------------------------------------------------ host lifetime


def test_nothing_left_after_fit_returns(ray_session, tmp_path):
    T = h.make_trainable(slots_per_host=2, steps_per_report=K, idle_timeout_s=3.0)
    grid, _ = h.fit(T, {"lr": tune.grid_search([0.01, 0.02, 0.03])}, tmp_path,
                    run_kw={"stop": {"training_iteration": 2}})
    assert h.errors(grid) == []
    assert not gone(T)  # the hosts outlive fit() only by the idle timeout
    assert h.wait_until(lambda: gone(T), timeout=30)
    assert h.wait_until(lambda: h.alive_actors() == [], timeout=20), h.alive_actors()


class RaiseAt(tune.Callback):
    def __init__(self, n):
        self.n = n

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.n -= 1
        if self.n == 0:
            raise RuntimeError("a driver-side failure in the middle of the sweep")


def test_nothing_left_after_fit_raises(ray_session, tmp_path):
    T = h.make_trainable(slots_per_host=2, steps_per_report=K, idle_timeout_s=3.0)
    with pytest.raises(Exception, match="driver-side failure"):
        h.fit(T, {"lr": tune.grid_search([0.01, 0.02, 0.03])}, tmp_path,
              run_kw={"stop": {"training_iteration": 50}, "callbacks": [RaiseAt(3)]})
    assert h.wait_until(lambda: gone(T), timeout=30)
    assert h.wait_until(lambda: h.alive_actors() == [], timeout=20), h.alive_actors()


@pytest.mark.slow  # a soak test: outside the README command, run by .ci/run
def test_nothing_left_after_the_driver_is_killed(ray_session, tmp_path):
    proc, info = driver(tmp_path, "killed", pause=0.2)
    exp = f"ray_modelbatch:{info['EXP']}:"
    try:
        assert h.alive_named(exp + "registry") and h.alive_named(exp + "host")
    finally:
        proc.kill()
        proc.wait(timeout=30)
    # The trial actors die with their driver; the detached registry sees every slot freed (the
    # leases died too) and stops its hosts and itself after the idle timeout.
    assert h.wait_until(lambda: not h.alive_named(exp), timeout=60), h.alive_named(exp)
    assert h.wait_until(lambda: h.alive_actors(info["JOB"]) == [], timeout=30), h.alive_actors(info["JOB"])


# ------------------------------------------------------------------------------- failure recovery


class KillHost(tune.Callback):
    """SIGKILLs the process of the host that produced the ``at``-th result; remembers its trials."""

    def __init__(self, T, at):
        self.T, self.at, self.victim, self.trials, self.recovered = T, at, None, set(), set()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.at -= 1
        if self.at == 0:
            host = next(s for s in self.T.host_stats() if s["host"] == result["host"])
            self.victim, self.trials = host["host"], set(host["trials"])
            os.kill(host["pid"], signal.SIGKILL)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.recovered.add(trial.trial_id)


@pytest.mark.slow  # a soak test: outside the README command, run by .ci/run
def test_killed_host_trials_resume_from_checkpoints_others_lose_nothing(reference, tmp_path):
    T = h.make_trainable(**h.SURVIVE_TRAINABLE)
    kill = KillHost(T, at=14)
    try:
        _, grid, log = survive_fit(tmp_path, "crash", callbacks=[kill], T=T)
        check_against_reference(grid, reference)
        assert kill.victim is not None and kill.trials and kill.recovered == kill.trials
        for r in grid:
            rows = log.rows(r)
            its = [x["training_iteration"] for x in rows]
            assert all(x["slot_steps"] == x["training_iteration"] * K for x in rows)  # resumed, not restarted
            if r.metrics["trial_id"] in kill.trials:
                assert set(its) == set(range(1, ITERS + 1))  # replayed from the checkpoint
                assert rows[-1]["host"] != kill.victim
            else:
                assert its == list(range(1, ITERS + 1))  # untouched: every iteration exactly once
    finally:
        T.shutdown_hosts()


# --------------------------------------------------------------------------------- driver restore


@pytest.mark.slow  # a soak test: outside the README command, run by .ci/run
def test_tuner_restore_after_the_driver_is_interrupted(reference, tmp_path):
    proc, info = driver(tmp_path, "interrupted", pause=0.3)
    proc.send_signal(signal.SIGINT)  # Ctrl+C: Tune saves the experiment state and stops
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    path = os.path.join(tmp_path, "interrupted")
    assert tune.Tuner.can_restore(path)
    T = h.make_trainable(**h.SURVIVE_TRAINABLE)
    try:
        grid = tune.Tuner.restore(path, trainable=T, resume_errored=True).fit()
        check_against_reference(grid, reference)
        for r in grid:
            df = r.metrics_dataframe
            assert set(df["training_iteration"]) == set(range(1, ITERS + 1)), r.path  # the whole history
            assert (df["slot_steps"] == df["training_iteration"] * K).all()
    finally:
        T.shutdown_hosts()


def test_a_dead_host_fails_its_trials_in_one_line_that_says_what_tune_does_next(ray_session, tmp_path):  # noqa: F811
    """With one host (the default on one node) the trials are objects in its process, so its death fails
    each with a bare ActorDiedError and ~25 lines of Tune's traceback that mention neither the host nor
    max_failures. Now one line per trial: the host died, and whether Tune restarts the trial."""
    import io
    import logging

    T = h.make_trainable(slots_per_host=2, steps_per_report=K)
    kill = KillHost(T, at=3)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("ray_modelbatch").addHandler(handler)
    try:
        grid, _ = h.fit(T, {"lr": tune.grid_search([0.1, 0.2])}, tmp_path, scheduler=FIFOScheduler(),
                        run_kw={"stop": {"training_iteration": 50}, "callbacks": [kill]})
    finally:
        logging.getLogger("ray_modelbatch").removeHandler(handler)
        T.shutdown_hosts()
    assert kill.victim is not None and len(h.errors(grid)) == 2
    lines = [ln for ln in log.getvalue().splitlines() if ln.startswith("Trial task failed for trial")]
    assert len(lines) == 2 and all("its slot host died (ActorDiedError), and every trial it served with it"
                                   in ln and "Set tune.FailureConfig(max_failures>=1)" in ln for ln in lines), lines
