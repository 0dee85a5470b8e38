"""How long a node's slot hosts take to start: ``max_concurrent()`` on a local Ray that declares N GPUs.

A registry starts one slot host per GPU. Each host imports torch and the
user's module, loads ``data()`` and (with ``slots_per_host="auto"``) profiles
the model; this script times that for N = 1 and N = ``--gpus`` hosts and
prints each host's constructor window (``init`` to ``ready``, seconds after the
call), so hosts that start one after another show as disjoint windows and hosts
that start side by side as overlapping ones. The GPUs are declared, not used:
the hosts compute on the CPU, so on a small machine N hosts still share its
cores.

    python benchmarks/host_start.py --gpus 4 [--data-in-host]

With ``--data-in-host`` the same starts run again with ``data_in_driver=False``
(each host calls ``data()`` itself) right after: the saving of the default.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import ray
import ray.cloudpickle

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import asha_sweep as sweep  # noqa: E402
import digits_cnn  # noqa: E402

for _module in (sweep, digits_cnn):  # not importable in Ray's workers: ship their functions by value
    ray.cloudpickle.register_pickle_by_value(_module)


def start_hosts(gpus: int, cpus: int, data_in_driver: bool = True) -> tuple[float, list[tuple[float, float]]]:
    """Seconds until ``max_concurrent()`` returns with ``gpus`` hosts, and each host's (init, ready) offsets."""
    ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, logging_level="WARNING")
    try:
        config = sweep.sample_configs(sweep.search_space(20), 1, 0)[0] | {"hidden": max(sweep.HIDDEN)}
        # slots_per_host="auto": max_concurrent() starts the hosts (each profiles the model), capped at 4 slots
        trainable = sweep.make_trainable("auto", num_hosts=None, profile_config=config, max_slots_per_host=4,
                                         idle_timeout_s=30.0, data_in_driver=data_in_driver)
        t0 = time.time()
        try:
            trainable.max_concurrent()
            wall = time.time() - t0
            windows = sorted((h["milestones"]["init"] - t0, h["milestones"]["ready"] - t0)
                             for h in trainable.host_stats())
        finally:
            trainable.shutdown_hosts()
        return wall, windows
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=4, help="GPUs the local Ray declares: one host each")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--data-in-host", action="store_true",
                    help="then start them again with data_in_driver=False (each host calls data() itself)")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs; local Ray with {args.cpus} CPUs")
    for data_in_driver in (True, False) if args.data_in_host else (True,):
        one, _ = start_hosts(1, args.cpus, data_in_driver)
        many, windows = start_hosts(args.gpus, args.cpus, data_in_driver)
        print(f"data() in the {'driver, once' if data_in_driver else 'host, each'}:")
        if len(windows) < args.gpus:  # each host reserves a CPU (host_cpus): the others wait for a later trial
            print(f"only {len(windows)} of {args.gpus} hosts fit the local Ray's {args.cpus} CPUs: raise --cpus")
        print(f"1 host: {one:.1f} s; {len(windows)} hosts: {many:.1f} s ({many / one:.2f}x one host; "
              f"{len(windows)}x would be one after another)")
        for i, (init, ready) in enumerate(windows):
            print(f"  host {i}: constructor {init:.1f} s -> ready {ready:.1f} s")


if __name__ == "__main__":
    main()
