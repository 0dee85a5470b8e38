"""Load: many short ASHA trials through a few slots of one host; memory per proxy and results/s.

The sweep is ``tests/test_tune_load.py``'s (digits, a 64-32-10 MLP, Adam,
ASHA with max_t 4, grace 1, reduction 2; random lr and seed), through one
slot host. While it runs, a sampler reads the USS of every Ray worker
process of this driver twice a second (see ``tune_sweep.MemorySampler``);
trial proxies are the ``pid``s Tune records in their results. Afterwards it
checks what the test checks: every trial's history is complete and
consistent, and every slot is free again.

    python benchmarks/load.py                        # 1000 trials, 32 slots, reuse_actors=True
    python benchmarks/load.py --trials 300 --slots 16 --no-reuse

Appends nothing by itself: copy the printed markdown into RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile

import ray

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]

import tune_helpers as h  # noqa: E402
from tune_sweep import MemorySampler, cpu_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="fused steps per Tune iteration")
    ap.add_argument("--no-reuse", action="store_true", help="one trial process per trial (reuse_actors=False)")
    args = ap.parse_args()

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as storage, MemorySampler(ignore=set()) as mem:
            T, grid, log, watch, wall = h.load_sweep(storage, trials=args.trials, slots=args.slots,
                                                     reuse_actors=not args.no_reuse, steps_per_report=args.steps)
            errors = h.errors(grid)
            complete = sum(
                1 for r in grid
                if [x["training_iteration"] for x in log.rows(r)] == list(range(1, r.metrics["training_iteration"] + 1))
            )
            leaked = None
            if h.wait_until(lambda: all(s["attached"] == s["reserved"] == 0 for s in T.host_stats()), timeout=30):
                leaked = 0
            else:
                leaked = sum(s["attached"] + s["reserved"] for s in T.host_stats())
            stats = T.host_stats()
            T.shutdown_hosts()
        proxies = {x["pid"] for rows in log.by_trial.values() for x in rows}
        proxy_peaks = sorted(uss for pid, (_, uss) in mem.per_pid.items() if pid in proxies)
        host_peaks = [uss for _, (name, uss) in mem.per_pid.items() if name == "SlotHost"]
    finally:
        ray.shutdown()

    mb = 2**20
    results = len(watch.times)
    lines = [
        f"Command: `{shlex.join(['python', 'benchmarks/load.py', *sys.argv[1:]])}`",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, {platform.python_version()}, Ray {ray.__version__}",
        "",
        "| trials | slots | reuse_actors | wall s | results | results/s (mean) | results/s (peak 2 s) "
        "| trial processes | proxy USS MB (median / max) | host USS MB | errors | complete histories | leaked slots |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {args.trials} | {args.slots} | {not args.no_reuse} | {wall:.1f} | {results} | {results / wall:.1f} "
        f"| {watch.peak_rate():.1f} | {len(proxies)} "
        f"| {proxy_peaks[len(proxy_peaks) // 2] / mb:.0f} / {proxy_peaks[-1] / mb:.0f} "
        f"| {max(host_peaks, default=0) / mb:.0f} | {len(errors)} | {complete}/{len(grid)} | {leaked} |",
        "",
        f"Host: {sum(s['fused_steps'] for s in stats)} fused steps, busy {max(s['busy_fraction'] for s in stats):.0%}, "
        f"most slots held at once {max(s['max_held'] for s in stats)} of {args.slots}.",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
