"""benchmarks/op_time.py: every aten call of a step is timed once and charged to the line that issued it."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import op_time  # noqa: E402


def test_every_call_is_counted_and_charged_to_the_torch_nn_line_that_issued_it():
    lin = nn.Linear(8, 4)
    x = torch.randn(16, 8)

    def step():
        lin.zero_grad()
        torch.relu(lin(x)).sum().backward()

    timer = op_time.time_ops(step, steps=2)
    by_op = {op: n for (op, _), n in timer.calls.items()}
    assert by_op["addmm"] == 2 and by_op["relu"] == 2  # one forward GEMM and one ReLU per step
    issuers = {where for (op, where) in timer.calls if op == "addmm"}
    assert len(issuers) == 1 and issuers.pop().startswith("linear.py:")  # nn.Linear.forward's F.linear
    assert all(s >= 0 for s in timer.seconds.values()) and sum(timer.seconds.values()) > 0


def test_a_fused_step_of_a_benchmark_family_runs_under_the_timer():
    step = op_time.fused_step_of("mlp_tiny", 4)
    step()
    timer = op_time.time_ops(step, steps=1)
    assert any(where.startswith(("mlp_step.py", "engine.py", "adam.py", "base.py")) for _, where in timer.calls)
