"""Tune schedulers and searchers end to end with real Ray: every stacked model is a real Tune trial.

Each test runs a small Tune experiment (digits, a 64-32-10 MLP, a few
iterations) through a batched trainable and checks what the scheduler or
searcher is supposed to do to trials, from the trials' own results and from
the slot host's figures.
"""

from __future__ import annotations

import io

import pytest
import ray
import torch
from ray import tune
from ray.tune.schedulers import (
    ASHAScheduler,
    FIFOScheduler,
    HyperBandScheduler,
    MedianStoppingRule,
    PopulationBasedTraining,
)

import tune_helpers as h
from tune_helpers import K, ray_session, trainables  # noqa: F401 - shared fixtures

# A new trial's process may ask for a slot in the moment between Tune ending the previous trial and
# that trial's cleanup() freeing it (one refused reservation, retried 0.2 s later). Oversubscription
# shows up as many: Tune running more live trials than slots (see the "unlimited" case).
REFUSALS_TOLERATED = 1
GOOD_FIRST = [0.05, 0.03, 0.02, 0.01, 3e-5, 2e-5, 1.5e-5, 1e-5]  # good trials start (and set the rungs) first




def assert_all_ok(grid, n):
    assert len(grid) == n
    assert h.errors(grid) == []
    for r in grid:
        for key in ("train_loss", "grad_norm", "lr", "nonfinite_steps", "nonfinite_steps_total",
                    "slot_steps", "slot", "stack", "host", "val_loss", "val_acc"):
            assert key in r.metrics, key


def assert_steps_continue(rows):
    """Every result of a trial: its slot has taken exactly K steps per Tune iteration so far."""
    for row in rows:
        assert row["slot_steps"] == K * row["training_iteration"], row


# ------------------------------------------------------------------------------------ schedulers


def test_fifo_all_trials_run_to_the_end_through_fewer_slots(trainables, tmp_path):
    T = trainables(slots_per_host=2)
    watch = h.HostWatch(T)
    grid, log = h.fit(T, {"lr": tune.grid_search([0.05, 0.02, 0.01, 0.005])}, tmp_path,
                 scheduler=FIFOScheduler(), run_kw={"stop": {"training_iteration": 3}, "callbacks": [watch]})
    assert_all_ok(grid, 4)
    for r in grid:
        rows = log.rows(r)
        assert [x["training_iteration"] for x in rows] == [1, 2, 3]
        assert_steps_continue(rows)
        assert rows[-1]["val_loss"] < rows[0]["val_loss"]  # it trained
        assert all(x["lr"] == pytest.approx(r.config["lr"]) for x in rows)
    assert {r.metrics["slot"] for r in grid} <= {0, 1}  # 4 trials through 2 slots
    assert 0 < watch.max_held <= 2
    [stats] = T.host_stats()
    assert stats["attached"] == 0 and stats["reserved"] == 0 and stats["refused"] <= REFUSALS_TOLERATED


def test_asha_stops_trials_early_and_refills_freed_slots(trainables, tmp_path):
    T = trainables(slots_per_host=4)
    watch = h.HostWatch(T)
    grid, log = h.fit(T, {"lr": tune.grid_search(GOOD_FIRST)}, tmp_path,
                 scheduler=ASHAScheduler(max_t=6, grace_period=1, reduction_factor=2),
                 run_kw={"stop": {"training_iteration": 6}, "callbacks": [watch]})
    assert_all_ok(grid, 8)
    iters = {r.config["lr"]: r.metrics["training_iteration"] for r in grid}
    assert min(iters.values()) < 6, iters  # ASHA stopped some trials early...
    assert max(iters.values()) == 6, iters  # ...and let the best run to max_t
    assert all(iters[lr] < 6 for lr in GOOD_FIRST[4:]), iters  # the bad ones, compared with the good rungs
    for r in grid:
        assert_steps_continue(log.rows(r))
    # 8 trials through 4 slots: the freed slots were handed to later trials.
    events = h.host_events(T)
    attaches = [e for e in events if e["event"] == "attach"]
    assert len({e["trial"] for e in attaches}) == 8
    assert {e["slot"] for e in attaches} <= set(range(4))
    assert 0 < watch.max_held <= 4
    [stats] = T.host_stats()
    assert stats["refused"] <= REFUSALS_TOLERATED and stats["attached"] == 0


def test_hyperband_pauses_and_resumes_from_checkpoint(trainables, tmp_path):
    T = trainables(slots_per_host=6)
    # max_t=4, eta=2: the first bracket takes 3 trials straight to 4 iterations; the second takes the
    # next 3 with a rung at 2 iterations: the first to arrive there are PAUSED until their bracket
    # mates arrive (so all 6 must be live at once: 6 slots), then the best 2 go on (a paused one in a
    # new trial actor, restored from its checkpoint) and the worst is stopped.
    grid, log = h.fit(T, {"lr": tune.grid_search([0.05, 0.02, 0.01, 0.03, 0.02, 1e-5])}, tmp_path,
                 scheduler=HyperBandScheduler(time_attr="training_iteration", max_t=4, reduction_factor=2),
                 run_kw={"stop": {"training_iteration": 4}})
    assert_all_ok(grid, 6)
    resumed = 0
    for r in grid:
        rows = log.rows(r)
        assert [x["training_iteration"] for x in rows] == list(range(1, len(rows) + 1))
        # slot_steps keeps growing across pauses: a resumed trial continued from its checkpoint
        # instead of restarting at K steps in its new slot.
        assert_steps_continue(rows)
        for prev, cur in zip(rows, rows[1:]):
            if cur["iterations_since_restore"] < cur["training_iteration"] and cur["iterations_since_restore"] == 1:
                resumed += 1  # a new trial actor restored from the pause's checkpoint (iterations_since_restore)
    assert resumed >= 1, "HyperBand should have paused and resumed a surviving trial"
    iters = sorted(r.metrics["training_iteration"] for r in grid)
    assert iters == [2, 4, 4, 4, 4, 4], iters  # the worst of the second bracket stopped at its rung


def test_hyperband_stops_a_trial_whose_pause_lands_after_its_bracket_finished(ray_session, tmp_path):
    """Ray 2.60's HyperBand leaves a trial PAUSED forever when its pause-checkpoint is still being saved as
    its bracket finishes (``ray_compat.stop_late_pauses_of_finished_brackets``): plain Tune, a slow save."""
    import time

    from ray_modelbatch.tune import ray_compat

    ray_compat.patch_tune_driver()  # what importing the trainable does in a driver

    class SlowSave(tune.Trainable):  # defined here, so that Ray's workers get it by value
        def setup(self, config):
            self.i = 0

        def step(self):
            self.i += 1
            time.sleep(0.0 if self.config["x"] == 0 else 0.3)  # the first trial reaches each milestone first
            return {"loss": self.config["x"] + 1.0 / self.i}

        def save_checkpoint(self, checkpoint_dir):
            time.sleep(1.5)  # its pause still saving when its bracket mates finish the bracket
            return checkpoint_dir

        def load_checkpoint(self, checkpoint_dir):
            pass

    started = time.monotonic()
    grid = tune.Tuner(tune.with_resources(SlowSave, {"cpu": 0.1}), param_space={"x": tune.grid_search([0, 1, 2, 3])},
                      tune_config=tune.TuneConfig(metric="loss", mode="min", time_budget_s=90,
                                                  scheduler=HyperBandScheduler(max_t=2, reduction_factor=2)),
                      run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()
    took = time.monotonic() - started
    assert h.errors(grid) == [] and len(grid) == 4
    assert took < 60, f"fit() took {took:.0f} s: a paused trial was left waiting until the time budget ended it"
    assert {r.metrics["training_iteration"] for r in grid} <= {1, 2}  # stopped at a milestone or at max_t


def test_median_stopping_rule_stops_bad_trials(trainables, tmp_path):
    T = trainables(slots_per_host=4)
    grid, log = h.fit(T, {"lr": tune.grid_search(GOOD_FIRST[:2] + GOOD_FIRST[-3:])}, tmp_path,
                 scheduler=MedianStoppingRule(time_attr="training_iteration", grace_period=2,
                                              min_samples_required=2),
                 run_kw={"stop": {"training_iteration": 4}})
    assert_all_ok(grid, 5)
    iters = {r.config["lr"]: r.metrics["training_iteration"] for r in grid}
    assert all(iters[lr] == 4 for lr in GOOD_FIRST[:2]), iters
    assert any(iters[lr] < 4 for lr in GOOD_FIRST[-3:]), iters
    for r in grid:
        assert_steps_continue(log.rows(r))


def _assert_lr_follows_config(grid, log):
    """The host's optimizer uses each trial's *current* config lr, before and after exploits."""
    changed = 0
    for r in grid:
        rows = log.rows(r)
        for x in rows:
            assert x["lr"] == pytest.approx(x["config"]["lr"], rel=1e-6, abs=1e-12), x
        changed += len({x["config"]["lr"] for x in rows}) > 1
    return changed


def test_pbt_explore_that_changes_the_batch_size_moves_the_recipient_to_a_stack_of_that_size(trainables, tmp_path):
    """PBT mutating ``batch_size`` (as Ray's transformers example does): the recipient loads its donor's state
    into a stack of the new batch size and trains on, its step count continued; it does not fail on the
    donor's data stream having been saved at the other size."""
    T = trainables(slots_per_host=4, batch_size=lambda c: c["batch_size"])
    pbt = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=2, synch=True,
                                  quantile_fraction=0.5, resample_probability=1.0,
                                  hyperparam_mutations={"batch_size": [16]})
    grid, log = h.fit(T, {"lr": tune.grid_search([0.05, 1e-5]), "batch_size": 32, "seed": 1}, tmp_path,
                      scheduler=pbt, run_kw={"stop": {"training_iteration": 4},
                                             "checkpoint_config": tune.CheckpointConfig(num_to_keep=None)})
    assert_all_ok(grid, 2)
    by_lr = {log.rows(r)[0]["config"]["lr"]: r for r in grid}
    a_rows, b_rows = log.rows(by_lr[0.05]), log.rows(by_lr[1e-5])
    assert all(x["config"]["batch_size"] == 32 for x in a_rows)  # the donor is never exploited
    assert [x["training_iteration"] for x in b_rows] == [1, 2, 3, 4]
    assert [x["config"]["batch_size"] for x in b_rows] == [32, 32, 16, 16]  # explored after iteration 2
    assert b_rows[2]["stack"] != b_rows[1]["stack"] and b_rows[2]["stack"] != a_rows[2]["stack"]
    assert_steps_continue(b_rows)
    assert all(x["nonfinite_steps_total"] == 0 for x in b_rows)


def test_pbt_recipient_continues_from_donor_weights_with_its_own_lr(trainables, tmp_path):
    """PBT exploit, numerically: the recipient gets the donor's weights, optimizer state and step count,
    and trains with its own new hyperparameters.

    Deterministic design: trial A (lr 0.05) is clearly better than B (lr 1e-5); synchronous PBT with
    two trials makes B exploit A at every perturbation, and its only possible new lr is 0.0. With
    lr 0 the weights cannot move, so the weights B reports and saves after the exploit must be
    *exactly* A's checkpoint weights: a B that restarted from scratch, kept its own weights or kept
    A's lr (0.05) would differ.
    """
    T = trainables(slots_per_host=2)
    pbt = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=2, synch=True,
                                  quantile_fraction=0.5, resample_probability=1.0,
                                  hyperparam_mutations={"lr": [0.0]})
    grid, log = h.fit(T, {"lr": tune.grid_search([0.05, 1e-5]), "seed": tune.grid_search([1])}, tmp_path,
                 scheduler=pbt,
                 run_kw={"stop": {"training_iteration": 5},
                         "checkpoint_config": tune.CheckpointConfig(num_to_keep=None)})
    assert_all_ok(grid, 2)
    assert _assert_lr_follows_config(grid, log) == 1
    by_lr = {log.rows(r)[0]["config"]["lr"]: r for r in grid}
    A, B = by_lr[0.05], by_lr[1e-5]
    a_rows, b_rows = log.rows(A), log.rows(B)
    assert [x["training_iteration"] for x in b_rows] == [1, 2, 3, 4, 5]
    a_val = {x["training_iteration"]: x["val_loss"] for x in a_rows}
    assert all(x["config"]["lr"] == 0.05 for x in a_rows)  # the donor is never exploited
    assert [x["config"]["lr"] for x in b_rows] == [1e-5, 1e-5, 0.0, 0.0, 0.0]  # exploits after 2 and 4
    for x in b_rows[2:]:
        # Iterations and slot steps go on from the donor's; with lr 0 the weights stay the donor's
        # checkpoint of the last exploit (iteration 2, then 4), so B's val loss is the donor's there.
        donor_iter = 2 if x["training_iteration"] <= 4 else 4
        assert x["slot_steps"] == K * x["training_iteration"]
        assert x["val_loss"] == pytest.approx(a_val[donor_iter], rel=1e-5), (x["training_iteration"], a_val)
    assert b_rows[2]["val_loss"] != pytest.approx(b_rows[1]["val_loss"], rel=1e-3)  # not its own weights

    # The checkpoint files. A's checkpoints by their step count; every B checkpoint after the first
    # exploit holds exactly the weights of A's checkpoint at that exploit, a step count continued from
    # A's (a restart from scratch would count from 0) and B's own new lr (0.0, where A has 0.05).
    a_ckpts = {}
    for p in h.trial_checkpoints(A.path):
        st = h.load_slot_state(p)
        a_ckpts[st["optimizer"]["steps"]] = st
    assert {2 * K, 4 * K} <= set(a_ckpts)
    b_ckpts = [h.load_slot_state(p) for p in h.trial_checkpoints(B.path)]
    b_steps = sorted(st["optimizer"]["steps"] for st in b_ckpts)
    assert 5 * K in b_steps  # its final checkpoint, at least
    for st in b_ckpts:
        steps = st["optimizer"]["steps"]
        if steps <= 2 * K:  # B's own pause checkpoint, before the first exploit
            assert st["optimizer"]["hparams"]["lr"] == pytest.approx(1e-5)
            continue
        donor = a_ckpts[2 * K] if steps <= 4 * K else a_ckpts[4 * K]
        assert st["optimizer"]["hparams"]["lr"] == 0.0
        assert donor["optimizer"]["hparams"]["lr"] == pytest.approx(0.05)
        for k, v in donor["model"].items():
            assert torch.equal(st["model"][k], v), (steps, k)


def test_pb2_explores_and_trials_use_their_new_lr(trainables, tmp_path):
    pytest.importorskip("GPy")
    from ray.tune.schedulers.pb2 import PB2

    T = trainables(slots_per_host=4)
    # Synchronous, so that the exploit after iteration 2 does not depend on the order of results.
    pb2 = PB2(time_attr="training_iteration", perturbation_interval=2, quantile_fraction=0.5, synch=True,
              hyperparam_bounds={"lr": [1e-4, 0.1]})
    grid, log = h.fit(T, {"lr": tune.grid_search([0.05, 0.03, 1e-5, 2e-5])}, tmp_path, scheduler=pb2,
                 run_kw={"stop": {"training_iteration": 4},
                         "checkpoint_config": tune.CheckpointConfig(num_to_keep=None)})
    assert_all_ok(grid, 4)
    # The two bad trials were exploited after iteration 2 and trained on with their new lr.
    assert _assert_lr_follows_config(grid, log) == 2
    for r in grid:
        rows = log.rows(r)
        assert_steps_continue(rows)
        assert [x["training_iteration"] for x in rows] == [1, 2, 3, 4]
        if r.config["lr"] != rows[0]["config"]["lr"]:  # a recipient: it left the bad start behind
            assert rows[2]["val_loss"] < rows[1]["val_loss"] - 0.5


# ------------------------------------------------------------------------ host-level save/restore


def test_host_save_restore_transfers_full_slot_state_with_own_hparams(ray_session):
    """Unit level, one real SlotHost actor: save trial A, restore into trial B with another config."""
    from ray_modelbatch.tune.host import SlotHost

    T = h.make_trainable(steps_per_report=K)
    host = ray.remote(SlotHost).options(max_concurrency=16, num_cpus=0).remote(T._spec_bytes, "unit-host", 4)
    lease = None  # driven directly, not by proxies: no lease check
    try:
        cfg = {"A": {"lr": 0.05, "seed": 1}, "B": {"lr": 0.001, "seed": 2}, "C": {"lr": 0.05, "seed": 3}}
        for tid in "ABC":
            ray.get(host.attach.remote(tid, cfg[tid], [lease]))
        ray.get([host.train.remote(t) for t in "AB"])
        ray.get([host.train.remote(t) for t in "AB"])
        load = lambda blob: torch.load(io.BytesIO(blob), weights_only=True)  # noqa: E731
        blob_a = ray.get(host.save.remote("A"))
        a = load(blob_a)
        ray.get(host.restore.remote("B", blob_a, cfg["B"]))
        ray.get(host.restore.remote("C", blob_a, cfg["C"]))
        b = load(ray.get(host.save.remote("B")))
        assert b["optimizer"]["steps"] == a["optimizer"]["steps"] == 2 * K
        for k, v in a["model"].items():
            assert torch.equal(b["model"][k], v), k
        for dt, st in a["optimizer"]["state"].items():
            assert st, "Adam has moment buffers"
            for name, v in st.items():
                assert torch.equal(b["optimizer"]["state"][dt][name], v), name
        assert b["optimizer"]["hparams"]["lr"] == pytest.approx(0.001)  # its own, not A's 0.05
        assert a["optimizer"]["hparams"]["lr"] == pytest.approx(0.05)
        # C got A's complete state *and* A's lr: it must now train exactly like A (same weights,
        # moments, step count and data stream); B, with its own lr, must not.
        ra, rb, rc = ray.get([host.train.remote(t) for t in "ABC"])
        assert ra["slot_steps"] == rb["slot_steps"] == rc["slot_steps"] == 3 * K
        assert rc["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-5)
        assert rc["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
        assert rb["lr"] == pytest.approx(0.001) and rc["lr"] == pytest.approx(0.05)
        wa, wb, wc = (load(ray.get(host.save.remote(t)))["model"]["0.weight"] for t in "ABC")
        assert torch.allclose(wa, wc, atol=1e-6)
        assert not torch.allclose(wa, wb, atol=1e-6)
    finally:
        ray.get(host.shutdown.remote())
        ray.kill(host)


# -------------------------------------------------------------------------------------- searchers


class LiveWatch(tune.Callback):
    """Tune's own view: how many trials were live (PENDING, RUNNING or PAUSED) at once.

    A trial whose process waits in ``setup()`` for a slot is still PENDING to Tune, so RUNNING alone
    would not show oversubscription.
    """

    def __init__(self):
        self.max_live = 0

    def _see(self, trials):
        self.max_live = max(self.max_live, sum(t.status in ("PENDING", "RUNNING", "PAUSED") for t in trials))

    def on_trial_start(self, iteration, trials, trial, **info):
        self._see(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._see(trials)


@pytest.mark.parametrize("searcher", [pytest.param("random", marks=pytest.mark.slow),
                                      pytest.param("grid", marks=pytest.mark.slow), "optuna", "unlimited"])
def test_searchers_never_oversubscribe_the_slots(trainables, tmp_path, searcher):
    """More trials than slots; the slot cap must hold, and "unlimited" shows the check can fail."""
    T = trainables(slots_per_host=2)
    watch, live = h.HostWatch(T), LiveWatch()
    kw: dict = {"num_samples": 4}
    space = {"lr": tune.loguniform(1e-3, 0.1)}
    if searcher == "grid":
        space = {"lr": tune.grid_search([0.05, 0.03, 0.02, 0.01])}
        kw["num_samples"] = 1
    elif searcher == "optuna":
        pytest.importorskip("optuna")
        from ray.tune.search.optuna import OptunaSearch

        from ray_modelbatch.tune import FreeSlotLimiter

        kw["search_alg"] = FreeSlotLimiter(OptunaSearch(metric="val_loss", mode="min", seed=0), T)
    elif searcher == "unlimited":
        kw["max_concurrent_trials"] = None
    grid, log = h.fit(T, space, tmp_path, run_kw={"stop": {"training_iteration": 2}, "callbacks": [watch, live]},
                 **kw)
    assert_all_ok(grid, 4)  # every trial ran to the end (waiting ones too)
    if searcher == "grid":
        assert sorted(r.config["lr"] for r in grid) == [0.01, 0.02, 0.03, 0.05]
    if searcher == "optuna":
        assert len({r.config["lr"] for r in grid}) == 4
    [stats] = T.host_stats()
    assert stats["max_held"] <= stats["capacity"] == 2
    assert watch.max_held <= 2
    assert len({e["trial"] for e in stats["events"] if e["event"] == "attach"}) == 4
    if searcher == "unlimited":
        # Tune started more trials than slots: the host refused the two extra trials' reservations (each at
        # least once; how often they asked again while waiting depends on timing) and they waited.
        assert live.max_live > 2 and stats["refused"] >= 2, (live.max_live, stats["refused"])
    else:
        assert live.max_live <= 2
        assert stats["refused"] <= REFUSALS_TOLERATED
