"""benchmarks/group_step.py runs and reports both ways of the MLP stack's step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # the MLP stack both ways in a fresh process: 6 s on a 2-core AMD EPYC; run by .ci/run
def test_group_step_benchmark_times_the_hand_written_and_the_autograd_step():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "group_step.py"), "--hidden", "32",
                          "--rounds", "1", "--iterations", "1"], capture_output=True, text=True, timeout=300, check=True)
    row = next(line for line in out.stdout.splitlines() if line.startswith("| 32 |"))
    hand, auto, ratio = (cell.strip() for cell in row.strip("|").split("|")[1:])
    assert float(hand.split()[0]) > 0 and float(auto) > 0 and ratio.endswith("x")
