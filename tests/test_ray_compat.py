"""The Ray workarounds install once per process, and an installer whose Ray internals are missing is retried.

Each workaround wraps a method of Tune's controller or checkpoint manager; a
second wrapping would run the workaround twice per call (a PBT deletion put
off twice, a HyperBand trial stopped twice), so ``patch_tune_driver``, which
every import of the trainable in the driver calls, must leave the wrappers as
they are.
"""

from __future__ import annotations

from ray.tune.execution.tune_controller import TuneController

from ray_modelbatch.tune import ray_compat


def test_patching_the_driver_twice_wraps_each_method_once():
    ray_compat.patch_tune_driver()
    wrapped = (TuneController.pause_trial, TuneController._schedule_trial_pause,
               TuneController._trial_task_failure, TuneController._schedule_trial_task)
    ray_compat.patch_tune_driver()
    assert (TuneController.pause_trial, TuneController._schedule_trial_pause,
            TuneController._trial_task_failure, TuneController._schedule_trial_task) == wrapped
    assert {"keep_restore_sources", "drop_stale_stop_on_pause", "stop_late_pauses_of_finished_brackets",
            "stop_sweep_on_setup_error", "run_trials_as_light_actors"} <= ray_compat._installed


def test_an_installer_that_finds_no_internals_is_tried_again():
    calls = []

    @ray_compat._install_once
    def workaround_for_test() -> bool | None:
        calls.append(1)
        return False if len(calls) == 1 else None  # another Ray the first time, then found

    try:
        workaround_for_test()
        assert "workaround_for_test" not in ray_compat._installed
        workaround_for_test()
        workaround_for_test()
        assert len(calls) == 2 and "workaround_for_test" in ray_compat._installed
    finally:
        ray_compat._installed.discard("workaround_for_test")
