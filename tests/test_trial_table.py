"""A slot host's table of trials' actor objects (``tune/trial_table.py``), driven from threads as Ray's are.

No Ray: the trials are :class:`SharedTrial` subclasses whose methods only record what ran.
"""

from __future__ import annotations

import threading
import time

import pytest

from ray_modelbatch.tune.trial_table import TrialGoneError, TrialTable


def _payload(log: list, fail_init: bool = False, name: str = "Rec") -> dict:
    def __init__(self, config, trial):
        if fail_init:
            raise ValueError("the model factory failed")
        self.config, self.trial, self.n = config, trial, 0

    def train(self):
        self.n += 1
        log.append((self.trial, "train", self.n))
        return {"training_iteration": self.n}

    def save(self):
        time.sleep(0.05)  # a slow call: the calls after it must wait for it
        log.append((self.trial, "save", self.n))
        return self.n

    def cleanup(self):
        log.append((self.trial, "cleanup", self.n))

    attrs = {"__init__": __init__, "train": train, "save": save, "cleanup": cleanup,
             "_close_log_files": lambda self: None, "_spec_bytes": b"", "_experiment": "", "_options": {}}
    return {"name": name, "class_name": name, "attrs": attrs}


def _calls_at_once(table: TrialTable, calls: list[tuple]) -> dict:
    """Submit every call on a thread of its own, in reverse order (Ray orders no threaded actor's tasks)."""
    out: dict = {}

    def run(i, call):
        try:
            out[i] = table.call(*call)
        except BaseException as exc:  # noqa: BLE001 - kept for the test to look at
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in reversed(threads):
        t.start()
        time.sleep(0.005)
    for t in threads:
        t.join(timeout=10)
    return out


def test_a_trials_calls_run_in_the_drivers_order_whatever_order_they_arrive_in():
    log: list = []
    table = TrialTable()
    assert table.call("a", 0, "__init__", ({}, "a"), {}, _payload(log)) is None
    out = _calls_at_once(table, [("a", 1, "__ray_ready__", (), {}), ("a", 2, "train", (), {}),
                                 ("a", 3, "save", (), {}), ("a", 4, "train", (), {}), ("a", 5, "train", (), {})])
    assert out == {0: True, 1: {"training_iteration": 1}, 2: 1, 3: {"training_iteration": 2},
                   4: {"training_iteration": 3}}
    assert log == [("a", "train", 1), ("a", "save", 1), ("a", "train", 2), ("a", "train", 3)]


def test_trials_run_side_by_side_and_a_failed_constructor_fails_only_its_trial():
    log: list = []
    table = TrialTable()
    table.call("bad", 0, "__init__", ({}, "bad"), {}, _payload(log, fail_init=True, name="Bad"))  # never raises
    table.call("good", 0, "__init__", ({}, "good"), {}, _payload(log))
    started = time.monotonic()
    out = _calls_at_once(table, [("good", 1, "save", (), {}), ("bad", 1, "__ray_ready__", (), {}),
                                 ("bad", 2, "train", (), {}), ("good", 2, "train", (), {})])
    assert time.monotonic() - started < 1.0
    assert out[0] == 0 and out[3] == {"training_iteration": 1}
    for i in (1, 2):  # as a dead actor would: every later call raises the constructor's error
        assert isinstance(out[i], ValueError) and "model factory failed" in str(out[i])


def test_stop_and_kill_end_a_trial_and_its_later_calls_fail():
    log: list = []
    table = TrialTable()
    for key in ("stopped", "killed"):
        table.call(key, 0, "__init__", ({}, key), {}, _payload(log))
    table.call("stopped", 1, "stop", (), {})  # Tune's graceful end: the trial's stop() (its cleanup())
    table.kill("killed")  # ray.kill's route
    assert ("stopped", "cleanup", 0) in log and ("killed", "cleanup", 0) in log
    for key in ("stopped", "killed"):
        with pytest.raises(TrialGoneError, match="has ended"):
            table.call(key, 3, "train", (), {})


def test_a_trial_killed_while_its_call_runs_fails_its_waiting_calls():
    log: list = []
    table = TrialTable()
    table.call("t", 0, "__init__", ({}, "t"), {}, _payload(log))
    results: dict = {}

    def call(seq, method):
        try:
            results[seq] = table.call("t", seq, method, (), {})
        except BaseException as exc:  # noqa: BLE001
            results[seq] = exc

    slow = threading.Thread(target=call, args=(1, "save"))  # 50 ms
    waiting = threading.Thread(target=call, args=(2, "train"))  # waits for its turn behind the save
    slow.start()
    waiting.start()
    time.sleep(0.01)
    table.kill("t")
    slow.join(timeout=5)
    waiting.join(timeout=5)
    assert results[1] == 0
    assert isinstance(results[2], TrialGoneError)
    assert ("t", "train", 1) not in log
