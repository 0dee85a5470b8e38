"""benchmarks/strided_gemm.py times both ways on every shape, and both ways leave the same parameters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ray_modelbatch import strided_gemm

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not strided_gemm.available(), reason="this torch carries no MKL batched GEMM")
def test_strided_gemm_benchmark_times_both_ways_and_they_agree():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "strided_gemm.py"), "--rounds", "1",
                          "--grid-slots", "16", "--slots", "16"], capture_output=True, text=True, timeout=300,
                         check=True)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| threads", "| family", "|---"))]
    grid, steps = [r for r in rows if len(r) == 7], [r for r in rows if len(r) == 6]
    assert len(grid) == 2 * 4 * 2  # threads x weights x batches
    for *_, per_slot, batched, ratio in grid:
        assert float(per_slot) > 0 and float(batched) > 0 and ratio.endswith("x")
    assert len(steps) == 1
    family, slots, per_slot, batched, ratio, same = steps[0]
    assert (family, slots, same) == ("mlp_784", "16", "bitwise")
    assert float(per_slot) > 0 and float(batched) > 0
