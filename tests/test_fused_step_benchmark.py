"""benchmarks/fused_step.py's repeated runs: the table shows each configuration's median run, the list every run.

The loop of plain models moves with a shared machine's phases by up to 1.6x between runs minutes apart, so
the benchmark's ``--repeat`` is how ratios get reported as medians; a wrong pick there would misreport every
family.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import fused_step  # noqa: E402


def _run(fused: float, loop: float, tag: str) -> dict:
    return {"fused_msps": fused, "loop_msps": loop, "tag": tag}


def test_median_run_is_a_real_run_with_every_ratio():
    runs = [_run(300, 100, "a"), _run(100, 100, "b"), _run(200, 100, "c")]
    got = fused_step.median_run(runs)
    assert got["tag"] == "c" and got["ratios"] == [3.0, 1.0, 2.0]
    # an even count takes the lower middle run; failed runs are left out; all failed gives the first failure
    assert fused_step.median_run(runs + [_run(400, 100, "d")])["tag"] == "c"
    assert fused_step.median_run([{"error": "x"}, _run(200, 100, "e")])["ratios"] == [2.0]
    assert fused_step.median_run([{"error": "x"}, {"error": "y"}]) == {"error": "x"}


@pytest.mark.slow  # three benchmark rounds with the machine-speed guard's retries: 20-60 s; run by .ci/run
def test_repeat_reports_the_median_round(tmp_path):
    out = tmp_path / "fs.md"
    subprocess.run([sys.executable, str(Path(fused_step.__file__)), "--models", "mlp_tiny", "--slots", "2",
                    "--min-time", "0.02", "--max-wait", "0", "--dense-n", "256", "--copy-mb", "8", "--repeat", "3",
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    text = out.read_text()
    row = re.search(r"^\| mlp_tiny \| 2 \| \w+ \|[^|]+\|[^|]+\| 2(?: @1t)? \|[^|]+\| ([\d.]+)x \|", text, re.M)
    rounds = re.search(r"^- mlp_tiny S=2: (.+) \(median ([\d.]+)x\)$", text, re.M)
    assert row and rounds, text
    ratios = [float(v) for v in re.findall(r"([\d.]+)x", rounds.group(1))]
    assert len(ratios) == 3
    assert float(row.group(1)) == float(rounds.group(2)) == round(statistics.median(ratios), 2)


def test_the_gpt2_family_has_hf_loss_and_counts_its_projections():
    pytest.importorskip("transformers")
    spec = fused_step.SPECS["gpt2"]
    model = spec.make()
    x, y = spec.batch(torch.Generator().manual_seed(0))
    assert model.lm_head.weight is model.transformer.wte.weight  # a tied head, as every GPT-2 LM has
    # the loss is the one GPT2LMHeadModel computes from labels=, to the bit
    assert spec.loss_fn(model(x), y).item() == model(x, labels=x).loss.item()
    per_token = 2 * (64 * 192 + 64 * 64 + 64 * 128 + 128 * 64) + 64 * fused_step.VOCAB  # Conv1D layers + head
    macs, _ = fused_step.step_flops(spec)
    assert macs == per_token * fused_step.SEQ
