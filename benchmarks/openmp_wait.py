"""The slot host's fused steps under each OpenMP wait policy, in a process shaped like the host's.

Why: in ``benchmarks/tune_sweep.py --arch cnn`` the host computed for 44-47 s
while the same fused steps took a third of that in ``benchmarks/fused_step.py``.
The difference is the process. A slot host is a Ray worker that has imported
``ray.tune`` and the user's ``data()`` (here scikit-learn's ``load_digits``,
which loads its own OpenMP and OpenBLAS runtimes), and it shares the node's
cores with Tune's driver and the trials' proxies. With torch's OpenMP threads
spinning at the end of every parallel region (libgomp's default), each small
op of a fused step can wait for a thread that is not running. The host now
sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads
(``ray_modelbatch.tune.host._passive_openmp``); this script measures why.

Each case runs in a fresh subprocess (OpenMP reads the policy when it loads):
the sweep's two CNN stacks (``examples/digits_cnn.py``, 4 and 16 channels, 8
slots each, the sweep's AdamW, per-slot digits batches of 64), stepped and
finished as the host does (``SlotGroup.step`` then ``finish``), after 30
warm-up rounds; the figure is ms per fused step, over ``--rounds`` rounds of
both stacks. ``--busy N`` adds N processes spinning on a core, as Tune's
driver or booting proxies do during a sweep. ``--arch mlp`` steps the sweep's
two MLP stacks instead (hidden 32 and 128), whose ops are a few microseconds
each. Runs without Ray (but imports it, as
the host does).

    python benchmarks/openmp_wait.py [--rounds 40] [--repeats 3] [--busy 1] [--arch mlp]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {  # name -> (torch threads, OMP_WAIT_POLICY or None for libgomp's default, GOMP_SPINCOUNT or None)
    "2 threads, default policy": (2, None, None),
    "2 threads, PASSIVE": (2, "PASSIVE", None),
    "2 threads, ACTIVE": (2, "ACTIVE", None),
    "2 threads, spin 10k then sleep": (2, None, "10000"),
    "2 threads, spin 1k then sleep": (2, None, "1000"),
    "1 thread": (1, None, None),
}
HOST_CASE = "2 threads, PASSIVE"  # what the slot host sets (tune.host._passive_openmp): the ratios' base


def child(threads: int, rounds: int, arch: str) -> None:
    """One case: build the two stacks as a host does and print ms per fused step."""
    sys.path.insert(0, str(ROOT / "examples"))
    import asha_sweep as sweep  # imports ray.tune, as the host's process has
    import torch
    from torch import nn

    import ray_modelbatch
    from ray_modelbatch.slot_group import SlotGroup, stack_key
    from ray_modelbatch.tune.spec import SlotSpec

    torch.set_num_threads(threads)
    spec = SlotSpec(model=sweep.make_model, optimizer=ray_modelbatch.optim.AdamW, hparams=sweep.optimizer_hparams,
                    loss=nn.functional.cross_entropy, data=sweep.load_digits_split,
                    metrics={"acc": ray_modelbatch.metrics.accuracy}, batch_size=64, steps_per_report=22)
    data = sweep.load_digits_split()  # scikit-learn, as the host's data() call
    groups = []
    for hidden in (32, 128):  # the sweep's two stacks (the CNN's: 4 and 16 channels)
        cfgs = [{"arch": arch, "hidden": hidden, "lr": 1e-3 * (i + 1), "wd": 1e-4, "warmup_steps": 5,
                 "total_steps": 440, "seed": 100 + i} for i in range(8)]
        first = sweep.make_model(cfgs[0])
        g = SlotGroup(spec, stack_key(first), first, data, 16, "cpu", run_ahead=2, config=cfgs[0])
        for i, c in enumerate(cfgs):
            torch.manual_seed(c["seed"])
            g.add(f"t{hidden}_{i}", sweep.make_model(c), seed=c["seed"], hparams=sweep.optimizer_hparams(c))
        groups.append(g)

    def run(n: int) -> None:
        for _ in range(n):
            for g in groups:
                g.finish(g.step(sorted(g.owner)))

    run(30)
    start = time.perf_counter()
    run(rounds)
    print(f"RESULT {(time.perf_counter() - start) * 1e3 / rounds / len(groups):.3f}")


def measure(threads: int, policy: str | None, spin: str | None, rounds: int, arch: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    if spin:
        env["GOMP_SPINCOUNT"] = spin
    out = subprocess.run([sys.executable, __file__, "--child", str(threads), "--rounds", str(rounds),
                          "--arch", arch], env=env, capture_output=True, text=True, check=True).stdout
    return float(next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=40, help="timed rounds (one fused step of each stack)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per case (the median is shown)")
    ap.add_argument("--busy", type=int, nargs="?", const=1, default=0,
                    help="processes spinning on a core beside each case (--busy alone: 1)")
    ap.add_argument("--arch", choices=("cnn", "mlp"), default="cnn", help="the sweep's CNN stacks or its MLP stacks")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.rounds, args.arch)
        return
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        rows = []
        for name, (threads, policy, spin) in CASES.items():
            times = [measure(threads, policy, spin, args.rounds, args.arch) for _ in range(args.repeats)]
            rows.append((name, statistics.median(times), times))
            print(f"  {name:<34} {statistics.median(times):8.1f} ms per fused step  (runs: "
                  f"{', '.join(f'{t:.1f}' for t in times)})", flush=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    base = rows[[name for name, _, _ in rows].index(HOST_CASE)][1]
    print(f"\n# OpenMP wait policy of the slot host\n\n- command: `python benchmarks/openmp_wait.py "
          f"{' '.join(sys.argv[1:])}`\n- machine: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs{f', {args.busy} busy processes beside each case' if args.busy else ''}, the sweep's "
          f"{args.arch.upper()} stacks\n")
    print("| case | ms per fused step (median) | runs | vs the host's |\n| --- | ---: | --- | ---: |")
    for name, med, times in rows:
        print(f"| {name} | {med:.1f} | {', '.join(f'{t:.1f}' for t in times)} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
