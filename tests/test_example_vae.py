"""The beta-VAE example runs end to end: its step samples through torch.distributions in every fused slot."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_vae_example_trains_every_trial(tmp_path):
    cmd = [sys.executable, "examples/vae_sweep.py", "--trials", "6", "--slots", "4", "--max-t", "3",
           "--num-cpus", "2", "--storage", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "6 VAEs (0 errored)" in r.stdout
    assert "best val_nelbo" in r.stdout
