"""Slots move from a host that is behind to one that idles, and train on exactly as if they had stayed.

* :func:`ray_modelbatch.tune.balance.plan_move` and ``pick_slot``: the decision, without Ray;
* the registry's balance tick: it asks the busy host, by its loads, to release a slot to the idle one;
* a real Tune sweep over two hosts in which one slot moves: every result and every checkpoint of every
  trial is bit-identical to the same sweep without the move, and the moved trial's later results come
  from the other host.
"""

from __future__ import annotations

import pytest
import ray
from ray import tune

import tune_helpers as h
from ray_modelbatch.tune import balance
from ray_modelbatch.tune.balance import HostLoad, Move, pick_slots, plan_move
from tune_helpers import ray_session, trainables  # noqa: F401 - shared fixtures


def _load(name, busy, held, free=4, moving=0, stacks=None):
    return HostLoad(name, busy, held, free, moving, stacks if stacks is not None else {"s": held})


def test_a_busy_host_gives_half_the_difference_to_an_idle_one():
    assert plan_move([_load("a", 0.97, 4), _load("b", 0.1, 0, stacks={})]) == Move("a", "b", 2, ())
    assert plan_move([_load("a", 0.97, 7), _load("b", 0.1, 2)]) == Move("a", "b", 2, ("s",))
    assert plan_move([_load("a", 0.97, 9), _load("b", 0.1, 0, free=1)]) == Move("a", "b", 1, ())  # its room
    # the receiver's stacks travel with the plan, so that the donor can send slots that join one of them
    assert plan_move([_load("a", 0.97, 4, stacks={"x": 2, "y": 2}), _load("b", 0.2, 1, stacks={"y": 1})]) \
        == Move("a", "b", 1, ("y",))


def test_nothing_moves_where_it_would_not_even_the_hosts():
    assert plan_move([_load("a", 0.97, 2), _load("b", 0.1, 1)]) is None  # it would only swap who holds more
    assert plan_move([_load("a", 0.6, 6), _load("b", 0.0, 0)]) is None  # the donor is not behind: Tune is
    assert plan_move([_load("a", 0.97, 6), _load("b", 0.7, 0)]) is None  # the receiver does not idle
    assert plan_move([_load("a", 0.97, 6), _load("b", 0.1, 0, free=0)]) is None  # ... and has no room
    assert plan_move([_load("a", 0.97, 6), _load("b", 0.1, 0, moving=1)]) is None  # one plan at a time
    assert plan_move([_load("a", 0.97, 6)]) is None


def test_of_several_hosts_the_most_uneven_pair_moves():
    loads = [_load("a", 0.9, 3), _load("b", 0.95, 7), _load("c", 0.3, 2), _load("d", 0.0, 0)]
    assert plan_move(loads) == Move("b", "d", 3, ())


def test_the_slots_that_move_join_a_stack_there_or_save_a_fused_step_here():
    assert pick_slots({"x": ["t1", "t2"], "y": ["t3"]}, ["x"], 1) == ["t2"]  # joins the receiver's stack x
    assert pick_slots({"x": ["t1", "t2"], "y": ["t3"]}, [], 1) == ["t3"]  # alone in y: y's whole step goes
    assert pick_slots({"x": ["t1", "t2"], "y": ["t3", "t4", "t5"]}, ["z"], 1) == ["t5"]  # from the largest
    # several: the later ones follow the first into its stack, so that they fuse there
    assert pick_slots({"x": ["t1", "t2", "t3"], "y": ["t4", "t5", "t6"]}, [], 3) == ["t3", "t2", "t1"]
    assert pick_slots({"x": ["t1"], "y": ["t2", "t3"]}, [], 5) == ["t1", "t3", "t2"]  # no more than there are
    assert pick_slots({"x": []}, [], 1) == []


@ray.remote(num_cpus=0)
class _FakeHost:
    """A host's balance interface: fixed loads, and the releases it was asked for."""

    def __init__(self, load):
        self._load, self.released = load, []

    def load(self):
        return self._load

    def release(self, receiver, stacks, count):
        self.released.append((receiver, stacks, count))
        return ["trial_1", "trial_2"][:count]

    def calls(self):
        return self.released


def test_the_registry_asks_the_busy_host_to_release_a_slot_to_the_idle_one(ray_session):  # noqa: F811
    from ray_modelbatch.tune.registry import HostRegistry

    busy = _FakeHost.remote({"name": "h0", "busy": 0.99, "held": 5, "free": 3, "moving": 0, "stacks": {"k": 5}})
    idle = _FakeHost.remote({"name": "h1", "busy": 0.05, "held": 1, "free": 7, "moving": 0, "stacks": {"k": 1}})
    registry = HostRegistry.__new__(HostRegistry)  # its state only: no idle watch, no hosts of its own
    registry.hosts = {"place0": ("h0", busy), "place1": ("h1", idle)}
    registry.experiment, registry.moves = "test", 0
    registry._balance()
    assert ray.get(busy.calls.remote()) == [("h1", ["k"], 2)] and ray.get(idle.calls.remote()) == []
    assert registry.moves == 2


class _MoveOne(tune.Callback):
    """Asks the host of the first trial to reach ``at`` iterations to hand one of its slots to the other host."""

    def __init__(self, T, at=2):
        self.T, self.at, self.released = T, at, None

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.released is not None or result["training_iteration"] != self.at:
            return
        from ray_modelbatch.tune.registry import NAMESPACE, registry_name

        registry = ray.get_actor(registry_name(self.T._experiment), namespace=NAMESPACE)
        hosts = dict(ray.get(registry.host_handles.remote()))
        other = next(name for name in hosts if name != result["host"])
        self.released = ray.get(hosts[result["host"]].release.remote(other, [], 1))


def _sweep(trainables, tmp_path, move):  # noqa: F811
    T = trainables(slots_per_host=4, num_hosts=2, host_cpus=0.5, move_slots=False)
    space = {"lr": tune.grid_search([0.05, 0.02, 0.01, 0.003]), "seed": tune.sample_from(lambda c: int(c["lr"] * 1e4))}
    mover = _MoveOne(T)
    grid, log = h.fit(T, space, tmp_path / ("moved" if move else "stayed"),
                      run_kw={"stop": {"training_iteration": 6}, "callbacks": [mover] if move else [],
                              "checkpoint_config": tune.CheckpointConfig(num_to_keep=None, checkpoint_frequency=1)})
    assert h.errors(grid) == []
    stats = T.host_stats()
    T.shutdown_hosts()
    runs = {}
    for r in grid:
        rows = log.by_trial[r.metrics["trial_id"]]
        ckpts = [h.load_slot_state(p) for p in h.trial_checkpoints(r.path)]
        runs[rows[0]["config"]["seed"]] = (rows, ckpts)
    return runs, stats, mover.released


# The trial server awaits the host's answers (SlotClient.step_async); a Trainable process per trial waits
# for them (SlotClient.step): both take the move. The classic way runs in CI's slow step.
@pytest.mark.parametrize("trials", ["shared", pytest.param("classic", marks=pytest.mark.slow)])
def test_a_slot_that_moves_to_another_host_trains_on_as_if_it_had_stayed(trainables, tmp_path, monkeypatch,  # noqa: F811
                                                                          trials):
    import torch

    monkeypatch.setenv("RAY_MODELBATCH_TRIALS", trials)
    stayed, _, _ = _sweep(trainables, tmp_path, move=False)
    moved, stats, released = _sweep(trainables, tmp_path, move=True)
    assert len(released) == 1, released
    assert sorted(s["moved_out"] for s in stats) == [0, 1] and sorted(s["moved_in"] for s in stats) == [0, 1]
    keys = ("train_loss", "grad_norm", "lr", "slot_steps", "val_loss", "val_acc", "nonfinite_steps_total")
    hopped = 0
    for seed, (rows, ckpts) in moved.items():
        want_rows, want_ckpts = stayed[seed]
        assert [r["training_iteration"] for r in rows] == list(range(1, 7))
        for got, want in zip(rows, want_rows):
            assert {k: got[k] for k in keys} == {k: want[k] for k in keys}, (seed, got["training_iteration"])
        hopped += len({r["host"] for r in rows}) == 2
        assert len(ckpts) == len(want_ckpts) == 6
        for a, b in zip(ckpts, want_ckpts):
            assert a["optimizer"]["steps"] == b["optimizer"]["steps"]
            for k, v in a["model"].items():
                assert torch.equal(v, b["model"][k]), (seed, k)
    assert hopped == 1  # the moved trial reported from both hosts; the others from one
    assert balance.MOVE_KEY not in str(moved)  # no trial ever saw the move itself


def _train_on(host, key, n):
    """``n`` results of attachment ``key``, as a trial's process asks for them; a move ends the list early."""
    out = []
    for _ in range(n):
        answer = host.train(key)
        out.append(answer)
        if balance.is_move(answer):
            break
    return out


def test_a_trial_that_came_before_a_wider_stack_moves_into_it_and_trains_on_as_alone(ray_session):  # noqa: F811
    # Trials of one model family come in any order. A narrow one that came first has a stack of its own widths;
    # the wider one after it makes a padded stack of the widest shapes. The first one then moves into that
    # stack at its next result boundary (SlotHost._gather_into), through the same move as between hosts.
    from ray_modelbatch.tune.host import SlotHost

    T = h.make_trainable(slots_per_host=4, run_ahead=1)
    narrow, wide = {"hidden": 24, "lr": 0.02, "seed": 1}, {"hidden": 32, "lr": 0.01, "seed": 2}
    alone, host = SlotHost(T._spec_bytes, "alone", 4, threads=1), SlotHost(T._spec_bytes, "host", 4, threads=1)
    try:
        assert alone.reserve("a") and alone.attach("trial_a", narrow, [None], None, "a")
        want = _train_on(alone, "a", 6)

        assert host.reserve("a")
        first = host.attach("trial_a", narrow, [None], None, "a")["stack"]
        got = _train_on(host, "a", 2)
        assert host.reserve("b")
        joined = host.attach("trial_b", wide, [None], None, "b")["stack"]
        assert joined != first  # a stack of the wider model's shapes, the widest of the family
        got += _train_on(host, "a", 6)
        move = got.pop()
        assert balance.is_move(move) and move[balance.MOVE_KEY]["to"] == "host"
        # ... as a trial's process does it (SlotClient._move): attach again, load the state, go on
        assert host.reserve("a2") and host.attach("trial_a", narrow, [None], None, "a2")["stack"] == joined
        host.restore("a2", move[balance.MOVE_KEY]["blob"], narrow, {"from": "host"})
        got += _train_on(host, "a2", 6 - len(got))
        stats = host.stats()
        assert stats["regrouped"] == 1 and stats["moved_out"] == stats["moved_in"] == 0
        assert got[0]["stack"] == first and got[-1]["stack"] == joined
        for g, w in zip(got, want, strict=True):  # the padded stack trains it as alone, to float rounding
            for k in ("train_loss", "val_loss", "val_acc", "grad_norm", "slot_steps"):
                assert abs(g[k] - w[k]) <= 1e-5 * max(1.0, abs(w[k])), (k, g, w)
    finally:
        alone.shutdown()
        host.shutdown()


def test_with_move_slots_off_a_trial_stays_in_its_stack(ray_session):  # noqa: F811
    from ray_modelbatch.tune.host import SlotHost

    T = h.make_trainable(slots_per_host=4, run_ahead=1, move_slots=False)
    host = SlotHost(T._spec_bytes, "host", 4, threads=1, move_slots=False)
    try:
        assert host.reserve("a") and host.reserve("b")
        first = host.attach("trial_a", {"hidden": 24, "lr": 0.02, "seed": 1}, [None], None, "a")["stack"]
        host.attach("trial_b", {"hidden": 32, "lr": 0.01, "seed": 2}, [None], None, "b")
        got = _train_on(host, "a", 5)
        assert not any(balance.is_move(r) for r in got) and {r["stack"] for r in got} == {first}
        assert host.stats()["regrouped"] == 0
    finally:
        host.shutdown()
