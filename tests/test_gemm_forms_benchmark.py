"""benchmarks/gemm_forms.py --inductor: Inductor's C++ GEMM template runs each of a Linear layer's three GEMMs."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gemm_forms  # noqa: E402


@pytest.mark.slow  # Inductor compiles three kernels: about 10 s on 2 cores
def test_inductor_forms_compile_and_time_the_three_gemms():
    out = gemm_forms.inductor_forms(2, 8, 16, 8, reps=2)
    assert set(out) == {"fwd", "dx", "dw", "compile_s"}
    assert all(math.isfinite(v) and v > 0 for v in out.values()), out
    torch._dynamo.reset()
