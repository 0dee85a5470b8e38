"""benchmarks/tune_sweep.py --repeat: every round's figures and the medians the target is judged on."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import tune_sweep  # noqa: E402


def _round(mb: float, reuse: float, iterations: int = 300) -> dict:
    return {"ray_modelbatch": {"wall_s": mb, "iterations": iterations},
            "standard+reuse": {"wall_s": reuse, "iterations": iterations}}


def _table(lines: list[str]) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines
            if line.startswith("| ") and not line.startswith(("| round", "| ---"))]


def test_the_rounds_table_gives_each_round_and_the_median_ratio_judged_against_the_target():
    args = argparse.Namespace(repeat=3, gpus=None, arch="mlp")
    kinds = ["ray_modelbatch", "standard+reuse"]
    # ratios 3x, 5x, 4.5x: the median ratio is 4.5x, not the ratio of the median walls (20 / 5 = 4x)
    rounds = [_round(6.0, 18.0), _round(4.0, 20.0), _round(5.0, 22.5, iterations=250)]
    lines = tune_sweep.rounds_table(args, kinds, rounds)
    rows = _table(lines)
    assert [r[0] for r in rows] == ["1", "2", "3", "median"]
    assert rows[0][1:] == ["6.0 (300)", "18.0 (300)", "20.0", "60.0", "3.00x"]
    assert rows[2][3] == "20.0"  # 5.0 s over 250 iterations
    assert rows[3][1] == "5.0 (300)" and rows[3][-1] == "**4.50x**"
    assert any("median of 3 rounds" in line and "4.50x -> met" in line for line in lines)


def test_an_unfinished_round_is_left_out():
    kinds = ["ray_modelbatch", "standard+reuse"]
    rounds = [_round(6.0, 18.0), {"ray_modelbatch": {"wall_s": 5.0, "iterations": 300}}]
    lines = tune_sweep.rounds_table(argparse.Namespace(repeat=2, gpus=None, arch="mlp"), kinds, rounds)
    assert [r[0] for r in _table(lines)] == ["1", "median"]
    assert any("3.00x -> not met" in line for line in lines)


def test_the_last_rounds_report_gets_the_table_before_its_details_and_the_whole_command():
    report = "\n".join(["# Ray Tune ASHA sweep", "", "- command: `python benchmarks/tune_sweep.py --out /tmp/r.md`",
                        "- machine: x", "", f"{tune_sweep.ROUND_MARK}; trial processes ...", "| run |"])
    args = argparse.Namespace(repeat=2, gpus=None, arch="mlp")
    text = tune_sweep._with_rounds(report, args, ["ray_modelbatch", "standard+reuse"],
                                   [_round(6.0, 18.0), _round(5.0, 20.0)])
    lines = text.splitlines()
    assert "--out /tmp/r.md" not in text and lines[2].startswith("- command: `python ")
    table = lines.index(next(line for line in lines if line.startswith("Rounds (2 of 2")))
    assert lines.index("- machine: x") < table < lines.index(next(line for line in lines
                                                                  if line.startswith(tune_sweep.ROUND_MARK)))
    assert "**3.50x**" in text


def test_held_slots_counts_attaches_less_detaches_every_step_from_the_first_attach():
    events = [{"t": 10.0, "event": "attach"}, {"t": 10.1, "event": "attach"}, {"t": 10.2, "event": "compact"},
              {"t": 10.7, "event": "detach"}, {"t": 11.2, "event": "detach"}]
    assert tune_sweep.held_slots(events, 8.0) == (2.0, [1, 2, 1, 0])
    assert tune_sweep.held_slots(events, 8.0, step=0.25)[1] == [1, 2, 2, 1, 1, 0]
    assert tune_sweep.held_slots([{"t": 1.0, "event": "compact"}], 0.0) is None
