"""benchmarks/ported_sweeps.py runs a plain Tune script and its port side by side and reports both."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # two small Tune sweeps, each in a fresh local Ray: ~30 s; run by .ci/run
def test_the_quick_pbt_script_runs_both_ways_and_reports_the_ratio(tmp_path):
    out = tmp_path / "ported.md"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ported_sweeps.py"), "--quick", "--scripts", "pbt",
                          "--out", str(out), "--storage", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = out.read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| pbt \| (plain|ported) \|.*$", text, re.M)}
    assert set(rows) == {"plain", "ported"}, text
    for row in rows.values():
        assert "| 4 (0) |" in row, row  # four trials, none failed
    assert re.search(r"^\| pbt \| [\d.]+x \| [\d.]+x \| .* \| yes \|$", text, re.M), text  # ratios, same configs
    assert "checkpoint loaded back" in text  # the best trial's model, reloaded from its checkpoint both ways
    assert "| time to plain's best |" in text


def test_the_time_to_a_value_is_that_of_the_first_result_as_good():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ported_sweeps
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    curve = [(1.0, 0.5), (2.0, 0.3), (3.0, 0.2)]  # (seconds into fit(), the metric of a result)
    assert ported_sweeps.time_to(curve, 0.3, "min") == 2.0
    assert ported_sweeps.time_to(curve, 0.1, "min") is None  # never reached
    assert ported_sweeps.time_to(curve, 0.4, "max") == 1.0
    assert ported_sweeps.time_to(curve, None, "min") is None
