"""A vocabulary's cross-entropy in pieces against torch's call, in whole fused steps: time, peak memory, bits.

Why: ``ray_modelbatch.wide_cross_entropy`` builds ``nll_loss``'s one-hot
gradient piece by piece instead of as logits-sized tensors (see there). This
benchmark trains ``fused_step.py``'s GPT-2 language model stack both ways:

- time: both stacks in one process, alternating, medians of ``--rounds``
  rounds (each the median of 5 steps);
- peak memory: each way in a fresh process (its peak resident set after 3
  steps, ``VmHWM`` on Linux; torch's own import included, the same in both);
- bits: how far apart both ways leave the parameters after 3 steps ("bitwise", or the largest relative difference).

    python benchmarks/wide_cross_entropy.py [--rounds 5] [--slots 8,32,128]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_step  # noqa: E402
import op_time  # noqa: E402

from ray_modelbatch import wide_cross_entropy  # noqa: E402

_APPLIES = wide_cross_entropy.applies


def _ways(pieces: bool) -> None:
    """Switch the stack's cross-entropy between the pieced one and torch's own call."""
    wide_cross_entropy.applies = _APPLIES if pieces else (lambda *args: False)


def fused_steps(name: str, slots: int, rounds: int) -> tuple[float, float, str]:
    """Median ms per fused step with torch's call and in pieces, and how far apart both leave the parameters."""
    return op_time.alternating_steps(name, slots, rounds, _ways)


def peak_mb(name: str, slots: int, pieces: bool) -> float:
    """Peak resident MB of a fresh process that trains the stack 3 steps one way."""
    out = subprocess.run([sys.executable, __file__, "--child", name, str(slots), str(int(pieces))],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def _child(name: str, slots: str, pieces: str) -> None:
    _ways(pieces == "1")
    step, _ = op_time.fused_stack_of(name, int(slots))
    for _ in range(3):
        step()
    # VmHWM, not ru_maxrss: Linux keeps a process's ru_maxrss across exec, so it would report the parent's size
    with open("/proc/self/status") as f:
        print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--models", default="gpt2")
    ap.add_argument("--slots", default="8,32,128")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(*args.child)
        return
    names = [n for n in args.models.split(",") if n in fused_step.SPECS]
    if not names:
        print(f"none of {args.models} is in fused_step.py here (GPT-2 needs transformers): nothing to compare")
        return
    print(f"- command: `python benchmarks/wide_cross_entropy.py {' '.join(sys.argv[1:])}`".rstrip())
    print(fused_step.machine(torch.device("cpu")))
    print(f"- time: medians of {args.rounds} alternating rounds in one process (each the median of 5 steps); "
          "peak: VmHWM of a fresh process after 3 steps")
    print("\n| family | slots | torch ms/step | pieces ms/step | torch / pieces | torch peak MB | pieces peak MB "
          "| same parameters |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name in names:
        for slots in (int(s) for s in args.slots.split(",")):
            a, b, same = fused_steps(name, slots, args.rounds)
            pa, pb = peak_mb(name, slots, False), peak_mb(name, slots, True)
            print(f"| {name} | {slots} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {pa:.0f} | {pb:.0f} | {same} |",
                  flush=True)


if __name__ == "__main__":
    main()
