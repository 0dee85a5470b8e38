"""benchmarks/kernel_time.py: which calls count as a step's kernels, and that their replay reads the same layouts."""

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import kernel_time  # noqa: E402


def test_records_the_kernels_of_forward_and_backward_and_nothing_else():
    lin = nn.Linear(8, 4)
    x = torch.randn(16, 8)

    def step():
        torch.relu(lin(x)).sum().backward()

    calls = kernel_time.record_heavy(step)
    names = [c.name for c in calls]
    # forward addmm, backward mm for the weight gradient (the input needs none); relu, sum and the bias
    # gradient's reduction are not kernels
    assert names == ["addmm", "mm"], names
    assert not any(kernel_time.is_heavy(op) for op in (torch.ops.aten.relu.default, torch.ops.aten.sum.default))
    assert kernel_time.is_heavy(torch.ops.aten.baddbmm_.default)  # an in-place weight-gradient accumulation


def test_replayed_tensors_keep_the_recorded_layout():
    a = torch.randn(4, 6, 5).transpose(1, 2)  # strided
    b = torch.randn(6, 3).unsqueeze(0).expand(4, 6, 3)  # stride 0 across the batch
    calls = kernel_time.record_heavy(lambda: torch.bmm(a, b))
    assert [c.name for c in calls] == ["bmm"]
    made = [kernel_time._make(v) for v in calls[0].args]
    for orig, new in zip((a, b), made):
        assert new.shape == orig.shape and new.stride() == orig.stride() and new.dtype == orig.dtype
    total, by_name = kernel_time.heavy_seconds(lambda: torch.bmm(a, b), reps=2)
    assert set(by_name) == {"bmm"} and total == by_name["bmm"] > 0


def test_identical_calls_are_timed_once_and_counted_each_time():
    a, b = torch.randn(32, 32), torch.randn(32, 32)
    calls = kernel_time.record_heavy(lambda: [torch.mm(a, b) for _ in range(3)])
    assert len(calls) == 3

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func is torch.ops.aten.mm.default
            return func(*args, **(kwargs or {}))

    with Count():
        by_name = kernel_time.replay_time(calls, reps=3, passes=2)
    assert Count.n == 1 + 2 * 3  # one warm-up and 2 x 3 timed runs of the one layout, not of each call
    assert set(by_name) == {"mm"} and by_name["mm"] > 0


def test_a_call_that_cannot_be_replayed_counts_as_free(capsys):
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    calls = kernel_time.record_heavy(lambda: (torch.mm(a, b), torch.addmm(a, a, b)))

    class Broken:  # an op whose replay raises, as a kernel might on random workspace bytes
        _schema = torch.ops.aten.addmm.default._schema

        def __call__(self, *args, **kwargs):
            raise RuntimeError("bad workspace")

    calls[1] = kernel_time.Call(Broken(), calls[1].args, calls[1].kwargs)
    by_name = kernel_time.replay_time(calls, reps=2, passes=2)
    assert by_name["addmm"] == 0.0 and by_name["mm"] > 0
    assert "addmm not replayed" in capsys.readouterr().err


def test_views_of_a_large_buffer_are_made_small_and_timed_once():
    """Each slot's view of a stacked buffer is made without the buffer in front of it, keeping only its
    alignment: per-slot calls on 128 slots' views would otherwise each allocate up to the whole buffer."""
    buf = torch.randn(64, 1024)  # rows 64-byte aligned alike: one alignment class
    h = torch.randn(4, 8)
    calls = kernel_time.record_heavy(lambda: [torch.mm(h, buf[s, :64].view(8, 8)) for s in range(64)])
    made = kernel_time._make(calls[-1].args[1])
    assert made.untyped_storage().nbytes() <= (64 + 16) * 4  # not 64,576 floats
    assert len({repr(c.args) for c in calls}) == 1  # one layout: timed once, counted 64 times


def test_a_loss_softmax_counts_as_a_kernel_and_replays():
    logits = torch.randn(32, 50, requires_grad=True)
    y = torch.randint(0, 50, (32,))

    def step():
        torch.nn.functional.cross_entropy(logits, y).backward()

    names = [c.name for c in kernel_time.record_heavy(step)]
    assert names == ["_log_softmax", "_log_softmax_backward_data"], names  # nll_loss and its backward are not
    total, by_name = kernel_time.heavy_seconds(step, reps=2)
    assert set(by_name) == set(names) and total > 0


def test_a_weight_gradient_written_by_mkl_batched_gemm_counts_and_replays_as_a_kernel():
    """ray_modelbatch.strided_gemm's operator is the step's weight-gradient GEMM: the kernel bound counts it."""
    from ray_modelbatch import strided_gemm

    if not strided_gemm.available():
        return
    flat = torch.zeros(4, 16 * 12 + 5)
    view = flat[:, :16 * 12].unflatten(1, (16, 12))
    a, b = torch.randn(4, 16, 8), torch.randn(8, 12).expand(4, 8, 12)
    calls = kernel_time.record_heavy(lambda: strided_gemm.bmm_into(view, a, b))
    assert [c.name for c in calls] == ["strided_bmm_"]
    times = kernel_time.replay_time(calls, reps=2, passes=1)
    assert list(times) == ["strided_bmm_"] and times["strided_bmm_"] > 0
