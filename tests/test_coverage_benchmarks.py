"""benchmarks/direct_coverage.py and benchmarks/architecture_survey.py run and report what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _rows(stdout: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in stdout.splitlines()
            if line.startswith("| ") and not line.startswith(("| family", "| model", "| ---"))]


def test_direct_coverage_times_the_direct_path_vmap_and_the_loop():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "direct_coverage.py"), "--slots", "2",
                          "--rounds", "1", "--reps", "1", "--families",
                          "VAE (randn_like, tuple out);LSTMCell loop;seq2seq (nn.Transformer)"],
                         capture_output=True, text=True, timeout=300, check=True)
    rows = {r[0]: r for r in _rows(out.stdout)}
    assert set(rows) == {"VAE (randn_like, tuple out)", "LSTMCell loop", "seq2seq (nn.Transformer)"}
    assert rows["VAE (randn_like, tuple out)"][2] == "direct" and rows["LSTMCell loop"][2] == "vmap"
    assert rows["seq2seq (nn.Transformer)"][2] == "direct"
    for r in rows.values():
        assert all(float(c) > 0 for c in r[3:6]) and all(c.endswith("x") for c in r[6:9])


@pytest.mark.slow  # builds and times every surveyed architecture: 7 s on a 2-core AMD EPYC; run by .ci/run
def test_architecture_survey_names_each_models_path_and_what_keeps_it_off_the_direct_path():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "architecture_survey.py"), "--slots", "2",
                          "--repeats", "1", "--only",
                          "VAE (randn_like, tuple out);nn.Transformer seq2seq;MLP with weight_norm;HF ViT classifier"],
                         capture_output=True, text=True, timeout=300, check=True)
    rows = {r[0]: r for r in _rows(out.stdout)}
    assert rows["VAE (randn_like, tuple out)"][1:3] == ["direct", ""]
    assert rows["nn.Transformer seq2seq"][1:3] == ["direct", ""]  # on vmap before session 41
    assert rows["MLP with weight_norm"][1] == "vmap" and "ParametrizedLinear" in rows["MLP with weight_norm"][2]
    # a transformers model trains on its own loss (labels= in its batch), on vmap for the reason that holds
    assert rows["HF ViT classifier"][1] == "vmap" and "Hugging Face" in rows["HF ViT classifier"][2]
    assert all(rows[n][6].endswith("x") for n in rows)
    # every fused slot computed what its model computes alone (training / evaluation differences)
    for n in rows:
        train, evaluation = (float(v) for v in rows[n][3].split(" / "))
        assert train < 1e-3 and evaluation < 1e-3, rows[n]
