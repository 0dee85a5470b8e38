"""Every example runs end to end as a user runs it, at a small size, and prints what shows that it trained.

Why: the examples are what a new user runs first (the README's main command is
``examples/asha_sweep.py``), and a library change can break one without
breaking a unit test. The beta-VAE example has its own test
(``test_example_vae.py``). Each run starts its own local Ray (2 CPUs) and
takes 5-20 s, so these are marked slow: ``.ci/run`` runs them, the README's
test command leaves them out.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run_example(script: str, *args: str) -> str:
    """Run ``examples/<script>`` with ``args``; its output, after checking that it exited cleanly."""
    r = subprocess.run([sys.executable, f"examples/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_the_asha_sweep_refills_slots_and_every_result_is_whole(tmp_path):
    out = run_example("asha_sweep.py", "--trials", "6", "--slots", "4", "--max-t", "3", "--num-cpus", "2",
                      "--storage", str(tmp_path))
    assert "Top 5 of 6 trials by validation loss" in out
    assert "slot integrity: every result had slot_steps == iteration x 22" in out
    assert "Slot timeline" in out and "best trial" in out


def test_the_pbt_sweep_copies_donors_and_every_result_is_whole(tmp_path):
    out = run_example("pbt_sweep.py", "--trials", "4", "--slots", "4", "--max-t", "4", "--interval", "2",
                      "--num-cpus", "2", "--storage", str(tmp_path))
    assert "Final population" in out and "best trial" in out
    assert "slot integrity: every result had slot_steps == iteration x 22" in out


def test_the_ported_cifar_script_trains_its_searched_batch_sizes(tmp_path):
    out = run_example("cnn_augment.py", "--trials", "4", "--slots", "4", "--max-epochs", "1", "--num-cpus", "2",
                      "--storage", str(tmp_path))
    assert "Best trial config" in out and "Best trial final validation loss" in out


def test_the_ported_pbt_gan_scores_its_generators(tmp_path):
    out = run_example("pbt_gan.py", "--trials", "2", "--slots", "2", "--max-t", "2", "--interval", "1",
                      "--num-cpus", "2", "--storage", str(tmp_path))
    assert "best is_score" in out


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is an optional extra")
def test_the_bert_text_classifier_sweep_trains(tmp_path):
    out = run_example("bert_text.py", "--trials", "4", "--slots", "4", "--max-t", "2", "--steps", "3",
                      "--num-cpus", "2", "--storage", str(tmp_path))
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["trial"])
    table = [float(line.split()[-1]) for line in lines[header + 1:header + 5] if len(line.split()) == 7]
    best = float(re.search(r"best validation accuracy ([0-9.]+)", out).group(1))
    assert len(table) == 4 and best == max(table)  # the best report of any trial, not the best trial's last


def test_the_standalone_sweep_trains_without_ray():
    out = run_example("standalone_sweep.py", "--slots", "4", "--steps", "50", "--logdir", "", "--no-progress")
    assert "status: {'finished': 4" in out and "200 slot-steps" in out
