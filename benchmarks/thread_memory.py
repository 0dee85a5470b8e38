"""A fused step on a slot host's engine thread: how glibc and torch keep its big tensors, and what that costs.

A slot host runs its fused steps on a thread of a Ray worker, which has
already given its own threads their malloc arenas. glibc's non-main arenas
hold at most 64 MB per heap, so a bigger tensor is mapped fresh from the OS
and unmapped again every step, and faults its pages in each time (see
``ray_modelbatch.cpu_memory``). This times one model of
``benchmarks/fused_step.py`` (default: the 28x28 CNN at 32 slots, whose
first activation is ~100 MB) on such a thread -- started after 20 other
threads took arenas -- in a fresh process per policy:

* ``default``: glibc as it comes (with ``keep_freed_memory``, as every host);
* ``MALLOC_ARENA_MAX=1``: every thread uses the main arena (the registry's
  ``runtime_env`` where a node has no huge pages; it costs the host an idle
  Ray worker);
* ``huge pages``: torch's ``THP_MEM_ALLOC_ENABLE=1``, set the way the host
  sets it (in the process, before torch is imported);
* both.

Each policy runs ``--rounds`` times, alternating; the table gives the median
ms per fused step and minor page faults per step of the thread::

    python benchmarks/thread_memory.py
    python benchmarks/thread_memory.py --model lenet_bn --slots 32 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

POLICIES = {
    "default": {},
    "MALLOC_ARENA_MAX=1": {"MALLOC_ARENA_MAX": "1"},
    "huge pages": {"RMB_BENCH_HUGE_PAGES": "1"},
    "both": {"MALLOC_ARENA_MAX": "1", "RMB_BENCH_HUGE_PAGES": "1"},
}


def measure(model: str, slots: int, steps: int, threads: int) -> dict:
    """In this (fresh) process: ms and page faults per fused step on a thread that got a non-main arena."""
    import resource
    import threading
    import time

    from ray_modelbatch.cpu_memory import keep_freed_memory, use_huge_pages

    huge = use_huge_pages() if os.environ.get("RMB_BENCH_HUGE_PAGES") == "1" else False
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fused_step as fs
    from ray_modelbatch import FusedEngine, ModelBatch
    from ray_modelbatch import optim as mb_optim

    keep_freed_memory()
    torch.set_num_threads(threads)
    hold = threading.Event()
    others = [threading.Thread(target=lambda: (bytearray(1000), hold.wait()), daemon=True) for _ in range(20)]
    for t in others:
        t.start()
    spec, out = fs.SPECS[model], {}

    def run() -> None:
        x, y = spec.batch(torch.Generator().manual_seed(0))
        mb = ModelBatch([spec.make() for _ in range(slots)])
        engine = FusedEngine(mb, mb_optim.Adam(mb, lr=[1e-3] * slots), spec.loss_fn)
        for _ in range(3):
            engine.train_step(x, y)
        ms, faults = [], []
        for _ in range(steps):
            f0, t0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt, time.perf_counter()
            engine.train_step(x, y)
            ms.append((time.perf_counter() - t0) * 1e3)
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0)
        out.update(ms=statistics.median(ms), faults=statistics.median(faults))

    engine_thread = threading.Thread(target=run)
    engine_thread.start()
    engine_thread.join()
    hold.set()
    return out | {"huge_pages": huge, "arena_max": os.environ.get("MALLOC_ARENA_MAX")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn", help="a model name of benchmarks/fused_step.py (default: cnn)")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="timed fused steps per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.model, args.slots, args.steps, args.threads)))
        return
    base = {k: v for k, v in os.environ.items()
            if k not in ("MALLOC_ARENA_MAX", "THP_MEM_ALLOC_ENABLE", "RMB_BENCH_HUGE_PAGES")}
    got: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for _ in range(args.rounds):
        for policy, env in POLICIES.items():
            cmd = [sys.executable, __file__, "--child", "--model", args.model, "--slots", str(args.slots),
                   "--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(cmd, env=base | env, capture_output=True, text=True, check=True)
            got[policy].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{policy}: {got[policy][-1]['ms']:.1f} ms", file=sys.stderr)
    from ray_modelbatch.cpu_memory import THP_MODE_FILE, huge_pages_usable

    try:
        with open(THP_MODE_FILE) as f:
            mode = f.read().strip()
    except OSError:
        mode = "none"
    print(f"# A fused step on a thread with a non-main malloc arena ({args.model}, {args.slots} slots)\n")
    print(f"- command: `python benchmarks/thread_memory.py {' '.join(sys.argv[1:])}`".rstrip())
    print(f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch "
          f"threads; transparent huge pages: `{mode}` (usable: {huge_pages_usable()})")
    print(f"- {args.rounds} alternating rounds, a fresh process each; per round the median of {args.steps} steps\n")
    print("| policy | ms per fused step (median; each round) | page faults per step (median) | huge pages in effect |")
    print("| --- | ---: | ---: | --- |")
    for policy, rows in got.items():
        ms = [r["ms"] for r in rows]
        print(f"| {policy} | {statistics.median(ms):.1f} ({', '.join(f'{m:.1f}' for m in ms)}) | "
              f"{statistics.median(r['faults'] for r in rows):,.0f} | {rows[0]['huge_pages']} |")


if __name__ == "__main__":
    main()
