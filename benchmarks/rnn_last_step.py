"""A recurrent layer's last output read apart against read from the outputs, in whole fused steps: time, bits.

Why: a classifier reads ``out[:, -1]`` (or ``h_n``) of an LSTM or GRU.
Read from the outputs, the step's gradient comes back as a zero tensor the
size of every output, and back-propagation reads it at every time step.
``ray_modelbatch.direct_rnn`` gives a one-directional layer's last output as
a tensor of its own (``SequenceAct``), whose gradient enters at the last step
alone. This benchmark trains ``fused_step.py``'s LSTM and GRU stacks (32 ->
64 over 16 steps, batch 64, the last step into a 10-class head) both ways in
one process, alternating, medians of ``--rounds`` rounds (each the median of
5 steps), and how far apart both ways leave the parameters after 3 steps ("bitwise", or the largest
relative difference).

    python benchmarks/rnn_last_step.py [--rounds 9] [--slots 8,32]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fused_step  # noqa: E402
import op_time  # noqa: E402

from ray_modelbatch import direct_rnn  # noqa: E402

_LAST_STEP = direct_rnn.last_step


def _ways(apart: bool) -> None:
    """Switch the stack's ``out[:, -1]`` between the layer's last output apart and a slice of its outputs."""
    direct_rnn.last_step = _LAST_STEP if apart else (lambda *args: None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--models", default="lstm,gru")
    ap.add_argument("--slots", default="8,32")
    args = ap.parse_args()
    os.environ.setdefault("RAY_MODELBATCH_RNN_KERNEL", "batched")  # the kernel that takes the last output apart
    print(f"- command: `python benchmarks/rnn_last_step.py {' '.join(sys.argv[1:])}`".rstrip())
    print(fused_step.machine(torch.device("cpu")))
    print(f"- medians of {args.rounds} alternating rounds in one process (each the median of 5 steps); recurrent "
          f"kernel: {os.environ['RAY_MODELBATCH_RNN_KERNEL']}")
    print("\n| family | slots | from the outputs ms/step | apart ms/step | ratio | same parameters |")
    print("|---|---:|---:|---:|---:|---|")
    for name in args.models.split(","):
        for slots in (int(s) for s in args.slots.split(",")):
            a, b, same = op_time.alternating_steps(name, slots, args.rounds, _ways)
            print(f"| {name} | {slots} | {a:.1f} | {b:.1f} | {a / b:.3f}x | {same} |", flush=True)


if __name__ == "__main__":
    main()
