"""benchmarks/wide_cross_entropy.py times and measures both ways, and both ways leave the same parameters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a GPT-2 stack both ways in a fresh process: 17 s on a 2-core AMD EPYC; run by .ci/run
def test_wide_cross_entropy_benchmark_compares_both_ways_and_they_agree():
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "wide_cross_entropy.py"), "--rounds", "1",
                          "--slots", "2"], capture_output=True, text=True, timeout=300, check=True)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| family")]
    assert len(rows) == 1
    family, slots, torch_ms, pieces_ms, ratio, torch_peak, pieces_peak, same = rows[0]
    assert (family, slots, same) == ("gpt2", "2", "bitwise")
    assert float(torch_ms) > 0 and float(pieces_ms) > 0 and ratio.endswith("x")
    assert float(torch_peak) > 0 and float(pieces_peak) > 0
