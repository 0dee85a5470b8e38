"""Every Python file of the project compiles without a warning.

Python 3.12 warns (SyntaxWarning) about an invalid escape such as ``\\ `` in a
docstring, which 3.11 only reports as a DeprecationWarning that nobody sees;
users on 3.12 would see it at every import.
"""

from __future__ import annotations

import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_compiles_without_warnings():
    files = [p for d in ("ray_modelbatch", "benchmarks", "examples", "tests", ".ci") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 100
    noisy = []
    for path in files:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                compile(path.read_text(), str(path), "exec")
            except (SyntaxError, SyntaxWarning, DeprecationWarning) as exc:
                noisy.append(f"{path.relative_to(ROOT)}: {exc}")
    assert not noisy, noisy
