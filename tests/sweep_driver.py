"""A sweep run as its own driver process, for the tests that kill or interrupt a driver.

Usage: python sweep_driver.py <ray address> <storage path> <name> [<seconds per result>]

Prints ``JOB <id>`` and ``EXP <experiment>`` first, then ``RESULT <n>`` at every
result, so the test knows when the sweep is in full swing. The optional pause
per result (in the driver, not the trials) keeps the sweep running long
enough to be interrupted in the middle.
"""

from __future__ import annotations

import sys
import time

import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler

import tune_helpers as h


class Progress(tune.Callback):
    def __init__(self, pause: float):
        self.pause, self.n = pause, 0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.n += 1
        print(f"RESULT {self.n}", flush=True)
        time.sleep(self.pause)


def main() -> None:
    address, storage, name = sys.argv[1:4]
    pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
    ray.init(address=address)
    T = h.make_trainable(**h.SURVIVE_TRAINABLE)
    print(f"JOB {ray.get_runtime_context().get_job_id()}", flush=True)
    print(f"EXP {T._experiment}", flush=True)
    tuner = tune.Tuner(
        T,
        param_space=h.SURVIVE_SPACE,
        tune_config=h.tune_config(T, scheduler=FIFOScheduler()),
        run_config=h.run_config(storage, name=name, callbacks=[Progress(pause)], **h.survive_run_kw()),
    )
    tuner.fit()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
