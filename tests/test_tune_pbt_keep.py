"""PBT with checkpoint retention: a recipient restores the donor's checkpoint and trains to the end.

The sweeps users reported (``CheckpointConfig(num_to_keep=4)``, PBT) failed a
trial per run with "Could not recover from checkpoint as it does not exist on
storage anymore". PBT points the recipient at a checkpoint directory of the
donor, but the donor's own retention (``_CheckpointManager``) knows nothing
of that and deletes the directory once the donor has saved ``num_to_keep``
newer checkpoints. Synchronous PBT restarts its paused trials one at a time
in trial order (donors first here); asynchronous PBT lets the donor train on
while the recipient's trial process starts. A batched slot trains an
iteration in a fraction of the ~2.5 s a trial process takes to start on this
machine, so the donor deletes first (standard Tune fails the same way when
its iterations are that short). Fix: ``ray_compat.keep_restore_sources``.

The same sweeps, with a checkpoint every iteration, showed a second Ray bug:
a recipient exploited while its pause-checkpoint was being saved (all slots
report in the same fused step) ends one iteration after the exploit,
TERMINATED without an error. Fix: ``ray_compat.drop_stale_stop_on_pause``.

The sweep below makes both certain: six trials, synchronous PBT (three
exploits at iteration 2), a checkpoint every iteration and ``num_to_keep=2``,
so a donor deletes the checkpoint it gave away within its next 2 iterations.
Before the fixes every run failed one way or the other, through both APIs.
"""

from __future__ import annotations

import copy
import os

import pytest
from ray import tune
from ray.tune.schedulers import PopulationBasedTraining

import tune_helpers as h
from tune_helpers import K, ray_session, trainables  # noqa: F401 - shared fixtures (Ray started and shut down)

KEEP = 2  # num_to_keep: a donor deletes the checkpoint PBT gave away 2 saves later
INTERVAL = 2  # perturbation_interval, in iterations
ITERS = 4  # the exploits after iteration 2, then a full interval after them
GOOD, BAD = [0.05, 0.03, 0.02], [1e-5, 2e-5, 3e-5]  # donors are the first trials: they restart first
NEW_LRS = [0.01, 0.02]  # a recipient's lr after its exploit


def _sweep(T, tmp_path, *, api: str, reuse: bool):
    """One synchronous PBT sweep through ``api`` ("tuner" or "run"); returns (outcomes, ResultLog).

    ``outcomes``: per trial its ID, its error (or None) and the path of the checkpoint Tune reports as
    its result, whichever API ran it.
    """
    pbt = PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=INTERVAL, synch=True,
                                  quantile_fraction=0.5, hyperparam_mutations={"lr": NEW_LRS})
    log = h.ResultLog()
    space = {"lr": tune.grid_search(GOOD + BAD), "seed": 0}
    checkpoints = tune.CheckpointConfig(num_to_keep=KEEP, checkpoint_frequency=1)
    stop = {"training_iteration": ITERS}
    budget = 90  # a sweep that stalls (sync PBT leaves its other trials PAUSED when recipients fail) ends here
    if api == "tuner":
        grid = tune.Tuner(
            T, param_space=space,
            tune_config=h.tune_config(T, scheduler=pbt, reuse_actors=reuse, time_budget_s=budget),
            run_config=h.run_config(tmp_path, stop=stop, checkpoint_config=checkpoints, callbacks=[log]),
        ).fit()
        outcomes = [{"trial_id": r.metrics["trial_id"], "error": r.error,
                     "checkpoint": r.checkpoint.path if r.checkpoint else None} for r in grid]
    else:
        analysis = tune.run(
            T, config=space, scheduler=pbt, metric="val_loss", mode="min", reuse_actors=reuse,
            max_concurrent_trials=T.max_concurrent(), time_budget_s=budget, stop=stop,
            checkpoint_config=checkpoints, callbacks=[log], storage_path=str(tmp_path), name="exp",
            verbose=0, raise_on_failed_trial=False,
        )
        outcomes = [{"trial_id": t.trial_id, "error": t.error_file if t.status == "ERROR" else None,
                     "checkpoint": t.checkpoint.path if t.checkpoint else None} for t in analysis.trials]
    return outcomes, log


def _error_text(error) -> str:
    if isinstance(error, str) and os.path.exists(error):  # tune.run gives the error file
        with open(error) as f:
            return f.read()[-300:]
    return str(error)[-300:]


@pytest.mark.parametrize("api,reuse", [("tuner", False), pytest.param("run", True, marks=pytest.mark.slow)],
                         ids=["Tuner", "tune.run-reuse_actors"])
def test_pbt_recipients_restore_donor_checkpoints_that_retention_would_delete(trainables, tmp_path, api, reuse):
    T = trainables(slots_per_host=6)
    outcomes, log = _sweep(T, tmp_path, api=api, reuse=reuse)

    assert len(outcomes) == 6
    failed = {o["trial_id"]: _error_text(o["error"]) for o in outcomes if o["error"] is not None}
    assert not failed, failed  # before: recipients, "does not exist on storage anymore"

    rows = {o["trial_id"]: sorted(log.by_trial[o["trial_id"]], key=lambda r: r["training_iteration"])
            for o in outcomes}
    recipients = [t for t, rs in rows.items() if rs[-1]["config"]["lr"] != rs[0]["config"]["lr"]]
    assert len(recipients) == 3, {t: [r["config"]["lr"] for r in rs] for t, rs in rows.items()}
    for t, rs in rows.items():
        assert [r["training_iteration"] for r in rs] == list(range(1, ITERS + 1)), t  # before: [1, 2, 3]
        # No progress lost: every slot's step count is K per iteration, so a recipient went on from
        # the donor's state after iteration 2 instead of starting again from scratch.
        for r in rs:
            assert r["slot_steps"] == K * r["training_iteration"], (t, r["training_iteration"], r["slot_steps"])
    for t in recipients:
        after = rows[t][INTERVAL]  # the first result after the exploit: from a restored checkpoint
        assert after["iterations_since_restore"] == 1 and after["config"]["lr"] in NEW_LRS, (t, after)

    # Every trial's reported checkpoint exists, and retention still deletes: no trial keeps the
    # checkpoint of its first iteration (no one restores from it), none keeps many more than num_to_keep.
    for o in outcomes:
        assert o["checkpoint"] and os.path.isdir(o["checkpoint"]), o
        kept = [os.path.basename(p) for p in h.trial_checkpoints(os.path.dirname(o["checkpoint"]))]
        assert "checkpoint_000000" not in kept and len(kept) <= KEEP + 2, kept


def test_retention_keeps_a_checkpoint_until_its_recipient_has_moved_on(tmp_path):
    """The workaround alone, without Ray running: the donor's deletion waits for the recipient."""
    import ray_modelbatch.tune.proxy  # noqa: F401 - installs ray_compat.keep_restore_sources
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    def save(trial: str, i: int) -> _TrainingResult:
        path = tmp_path / trial / f"checkpoint_{i:06d}"
        path.mkdir(parents=True)
        return _TrainingResult(checkpoint=tune.Checkpoint.from_directory(str(path)), metrics={})

    def left(trial: str) -> list[str]:
        return sorted(os.listdir(tmp_path / trial))

    donor, recipient = (_CheckpointManager(tune.CheckpointConfig(num_to_keep=1)) for _ in "dr")
    donor.register_checkpoint(save("donor", 0))
    recipient.register_checkpoint(save("recipient", 0))
    given = donor.latest_checkpoint_result  # what pbt.py's _exploit does to the recipient:
    recipient._latest_checkpoint_result = _TrainingResult(checkpoint=copy.copy(given.checkpoint), metrics={})
    for i in (1, 2):
        donor.register_checkpoint(save("donor", i))
    assert left("donor") == ["checkpoint_000000", "checkpoint_000002"]  # kept for the recipient
    recipient.register_checkpoint(save("recipient", 1))  # it restored and saved: no one needs it now
    assert left("donor") == ["checkpoint_000002"]
    assert left("recipient") == ["checkpoint_000001"]


def test_retention_keeps_what_pbt_would_clone_until_it_moves_on(ray_session, tmp_path):  # noqa: F811
    """Async PBT's variant: the donor's checkpoint PBT took at its last perturbation (a save future PBT
    resolves only at the exploit) outlives num_to_keep newer saves while the donor runs."""
    import ray
    import ray_modelbatch.tune.proxy  # noqa: F401 - installs ray_compat.keep_restore_sources
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _FutureTrainingResult, _TrainingResult
    from ray.tune.schedulers.pbt import _PBTTrialState

    class Donor:  # what _PBTTrialState and the workaround read of a Trial
        experiment_tag, finished = "donor", False

        def is_finished(self):
            return self.finished

    def save(i: int) -> _TrainingResult:
        path = tmp_path / f"checkpoint_{i:06d}"
        path.mkdir()
        return _TrainingResult(checkpoint=tune.Checkpoint.from_directory(str(path)), metrics={})

    donor, manager = Donor(), _CheckpointManager(tune.CheckpointConfig(num_to_keep=1))
    state = _PBTTrialState(donor)
    taken = save(0)
    state.last_checkpoint = _FutureTrainingResult(ray.put(taken))  # pbt.py: _schedule_trial_save
    manager.register_checkpoint(taken)  # the controller registers the same save
    for i in (1, 2):
        manager.register_checkpoint(save(i))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_000000", "checkpoint_000002"]
    donor.finished = True  # PBT never clones a finished trial
    manager.register_checkpoint(save(3))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_000003"]


def test_the_slow_setup_notice_is_off_for_batched_trials():
    """Tune's "setup took N s ... consider reuse_actors" notice: a batched trial's setup waits for the shared host."""
    from ray.tune.trainable import trainable as tune_trainable

    from ray_modelbatch.tune.ray_compat import quiet_setup_time_notice

    before = tune_trainable.SETUP_TIME_THRESHOLD
    try:
        quiet_setup_time_notice()
        assert tune_trainable.SETUP_TIME_THRESHOLD == float("inf")
    finally:
        tune_trainable.SETUP_TIME_THRESHOLD = before
