"""Every ``python`` block of the README runs as written, in a fresh process, so the docs never rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    code = BLOCKS[index]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"README block {index} failed:\n{code}\n--- stderr ---\n{out.stderr[-4000:]}"
    assert "Traceback" not in out.stderr, out.stderr[-4000:]
    assert "anonymous namespace" not in out.stderr, "the registry is a detached actor: give it a namespace"
    if "tune.Tuner" in code:
        lines = out.stdout.splitlines()
        progress = [line for line in lines if "trials" in line and "done" in line]
        assert progress and "best val_loss" in progress[-1], out.stdout[-3000:]
        assert len(lines) < 200, f"{len(lines)} lines of output: a sweep should print a screenful, not a log"
