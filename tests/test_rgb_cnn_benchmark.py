"""benchmarks/rgb_cnn.py runs, times the three ways and checks the fused slots against the loop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_rgb_cnn_benchmark_reports_every_way_and_the_fused_slots_agree_with_the_loop():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rgb_cnn.py"), "--slots", "2", "--channels", "3",
                          "--rounds", "1", "--reps", "1"], capture_output=True, text=True, timeout=300, check=True)
    row = next(line for line in out.stdout.splitlines() if line.startswith("| 3 | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    fused, torch_kernel, loop = (float(c) for c in cells[2:5])
    assert fused > 0 and torch_kernel > 0 and loop > 0
    assert cells[5].endswith("x") and cells[6].endswith("x")
    assert float(cells[7].split()[0]) < 1e-4  # the median slot: rounding, not a different model
