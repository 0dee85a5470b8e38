"""benchmarks/moment_sqrt.py times both roots on every case, and both leave the same parameters."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # every case both ways in a fresh process: 6 s on a 2-core AMD EPYC; run by .ci/run
def test_moment_sqrt_benchmark_times_both_roots_and_they_agree():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moment_sqrt.py"), "--rounds", "1",
                          "--slots", "4"], capture_output=True, text=True, timeout=300, check=True)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| case", "| ---"))]
    assert len(rows) == 7
    for case, _, clamp_ms, plain_ms, gain, on, same in rows:
        assert float(clamp_ms) > 0 and float(plain_ms) > 0 and gain.endswith("x")
        assert same == "yes", case
    assert [r[5] for r in rows if "embedding" in r[0]] == ["yes"] * 4  # half the rows are zeros
