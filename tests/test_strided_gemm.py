"""MKL's batched GEMM into strided stacks (ray_modelbatch.strided_gemm): torch's batched values to the bit."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ray_modelbatch import fast_path, strided_gemm

pytestmark = pytest.mark.skipif(not strided_gemm.available(), reason="this torch carries no MKL batched GEMM")


def _flat_view(count: int, rows: int, cols: int, pad: int = 37, dtype=torch.float32) -> torch.Tensor:
    """A ``[count, rows, cols]`` view of a slot-major flat buffer: contiguous matrices ``rows*cols + pad`` apart."""
    flat = torch.full((count, rows * cols + pad), float("nan"), dtype=dtype)
    return flat[:, pad // 2:pad // 2 + rows * cols].unflatten(1, (rows, cols))


def _rounds_by_alignment(dtype: torch.dtype) -> bool:
    """Whether this CPU's MKL rounds a GEMM by where its result lies: a few products, each written into two
    views at different alignments, compared. Never on the Intel Xeons of sessions 35-45; on the AMD EPYC of
    session 46 where the result is not 16-byte aligned, for fp32 results of few columns (8, 9, 10: up to 1e-5
    apart) and fp64 ones of up to 64."""
    torch.manual_seed(5)
    for m, k, n in ((5, 16, 8), (1, 64, 9), (32, 64, 64)):
        a, b = torch.randn(1, m, k, dtype=dtype), torch.randn(1, k, n, dtype=dtype)
        views = [_flat_view(1, m, n, pad=pad, dtype=dtype) for pad in (0, 3, 37)]  # offsets 0, 1 and 18 values
        for v in views:
            assert strided_gemm.bmm_into(v, a, b)
        if not all(torch.equal(views[0], v) for v in views[1:]):
            return True
    return False


def _assert_torch_batched_values(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out`` holds torch's batched GEMM's values: to the bit, unless this CPU's MKL rounds by alignment
    (``out`` and torch's contiguous result lie differently), then to the rounding of the dtype."""
    expected = torch.bmm(a, b)
    if _rounds_by_alignment(out.dtype):
        eps = torch.finfo(out.dtype).eps
        torch.testing.assert_close(out, expected, rtol=64 * eps, atol=64 * eps * float(expected.abs().max()))
    else:
        assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# Products of at least 400 multiply-adds: below that torch's bmm runs a loop of its own, not MKL.
@pytest.mark.parametrize("count,m,k,n", [(1, 5, 16, 8), (8, 32, 64, 64), (16, 256, 64, 300), (3, 1, 64, 9),
                                         (4, 6, 80, 1)])
@pytest.mark.parametrize("a_form", ["rows", "cols", "shared"])
def test_equals_torch_batched_gemm_bit_for_bit(dtype, count, m, k, n, a_form):
    """The values torch's batched GEMM gives into a contiguous result, and torch's one GEMM per slot gives
    into the same strided view (its path before this module): a weight gradient's bits do not change."""
    torch.manual_seed(0)
    if a_form == "rows":
        a = torch.randn(count, m, k, dtype=dtype)
    elif a_form == "cols":  # a transposed view, as a weight gradient's (the output's gradient, transposed)
        a = torch.randn(count, k, m, dtype=dtype).transpose(1, 2)
    else:  # one input every slot shares (batch stride 0)
        a = torch.randn(m, k, dtype=dtype).expand(count, m, k)
    b = torch.randn(count, k, n, dtype=dtype)
    out = _flat_view(count, m, n, dtype=dtype)
    assert not out.is_contiguous() or count == 1
    assert strided_gemm.bmm_into(out, a, b)
    _assert_torch_batched_values(out, a, b)
    if n > 1:  # (a single column: torch's per-slot path runs a matrix-vector kernel of other rounding)
        torch_strided = _flat_view(count, m, n, dtype=dtype)
        torch.bmm(a, b, out=torch_strided)
        assert torch.equal(out, torch_strided)
    before = out.clone()
    assert strided_gemm.bmm_into(out, a, b, add=True)  # beta = 1: a gradient accumulated
    assert torch.allclose(out, before + torch.bmm(a, b), rtol=1e-6, atol=1e-6)


def test_transposed_second_operand_and_shared_second_operand():
    torch.manual_seed(1)
    a = torch.randn(6, 10, 12)
    b_t = torch.randn(6, 9, 12).transpose(1, 2)  # a weight read transposed, as the forward reads it
    out = _flat_view(6, 10, 9)
    assert strided_gemm.bmm_into(out, a, b_t)
    _assert_torch_batched_values(out, a, b_t)
    shared = torch.randn(12, 9).expand(6, 12, 9)
    assert strided_gemm.bmm_into(out, a, shared)
    _assert_torch_batched_values(out, a, shared)
    for b in (b_t, shared):  # torch's own GEMMs into the same view (its path before this module): to the bit
        torch_strided = _flat_view(6, 10, 9)
        torch.bmm(a, b, out=torch_strided)
        assert strided_gemm.bmm_into(out, a, b) and torch.equal(out, torch_strided)


@pytest.mark.parametrize("case", ["int", "mixed_dtype", "shape", "overlap", "cols_out", "gathered_a", "grad"])
def test_declines_what_it_cannot_write_and_writes_nothing(case):
    a, b = torch.randn(4, 3, 5), torch.randn(4, 5, 2)
    out = _flat_view(4, 3, 2)
    if case == "int":
        a, b, out = a.long(), b.long(), out.nan_to_num().long()
    elif case == "mixed_dtype":
        b = b.double()
    elif case == "shape":
        b = torch.randn(4, 4, 2)
    elif case == "overlap":  # matrices that share memory: never a gradient buffer
        out = torch.zeros(10).as_strided((4, 3, 2), (1, 2, 1))
    elif case == "cols_out":
        out = torch.zeros(4, 2, 3).transpose(1, 2)
    elif case == "gathered_a":  # neither rows nor columns contiguous
        a = torch.randn(4, 6, 10)[:, ::2, ::2]
    elif case == "grad":
        a.requires_grad_(True)
    before = out.clone()
    assert not strided_gemm.bmm_into(out, a, b)
    assert torch.equal(out.nan_to_num(7.0), before.nan_to_num(7.0))  # untouched, NaN padding included


def test_the_operator_traces_on_meta_tensors():  # (shape-only tools: it writes into out, whose shape stays)
    out, a, b = (torch.empty(*shape, device="meta") for shape in ((4, 3, 2), (4, 3, 5), (4, 5, 2)))
    torch.ops.ray_modelbatch.strided_bmm_(out, a, b, False)
    assert out.shape == (4, 3, 2)


def test_the_operator_rejects_layouts_it_cannot_read_with_a_clear_message():
    a = torch.randn(4, 6, 10)[:, ::2, ::2]
    with pytest.raises(Exception, match="bmm_into"):
        torch.ops.ray_modelbatch.strided_bmm_(torch.zeros(4, 3, 2), a, torch.randn(4, 5, 2), False)


def test_dispatch_modes_see_the_kernel_as_a_torch_operator():
    out, a, b = _flat_view(3, 4, 5), torch.randn(3, 4, 6), torch.randn(3, 6, 5)
    ops = _ops_called(lambda: strided_gemm.bmm_into(out, a, b))
    assert ops == ["ray_modelbatch.strided_bmm_.default"]


def _ops_called(fn) -> list[str]:
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return seen


@pytest.mark.parametrize("slots,threads", [(fast_path.STRIDED_GEMM_MIN_SLOTS - 1, 2),
                                           (fast_path.STRIDED_GEMM_MIN_SLOTS, 2), (fast_path.STRIDED_GEMM_MIN_SLOTS, 1)])
def test_a_large_weight_gradient_is_written_in_place_with_torch_batched_values(slots, threads, monkeypatch):
    """fast_path.write_weight_grad, for a weight at or above DIRECT_WRITE_MIN: the slot-major buffer's
    strided view gets what one batched GEMM into a contiguous result gives, and accumulates; from
    STRIDED_GEMM_MIN_SLOTS slots on several threads by MKL's batched GEMM, else by torch's GEMM per slot."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    torch.manual_seed(2)
    rows, cols, batch = 128, fast_path.DIRECT_WRITE_MIN // 128, 16
    view = _flat_view(slots, rows, cols)
    gt = torch.randn(slots, batch, rows).transpose(1, 2)
    hs = torch.randn(batch, cols).expand(slots, batch, cols)
    ops = _ops_called(lambda: fast_path.write_weight_grad(view, False, gt, hs))
    batched = slots >= fast_path.STRIDED_GEMM_MIN_SLOTS and threads > 1
    assert ("ray_modelbatch.strided_bmm_.default" in ops) == batched, ops
    expected = torch.bmm(gt, hs)
    assert torch.equal(view, expected)
    fast_path.write_weight_grad(view, True, gt, hs)
    assert torch.allclose(view, 2 * expected, rtol=1e-6, atol=1e-5)


def test_a_stack_of_wide_mlps_trains_the_same_bits_both_ways_and_as_each_model_alone(monkeypatch):
    """16 MLPs whose 256x64 layers reach DIRECT_WRITE_MIN, 3 Adam steps on 2 threads: the batched call is
    taken and leaves the parameters torch's per-slot GEMMs leave, and each slot trains as its model alone."""
    from torch import nn
    from torch.nn import functional as F

    from ray_modelbatch import FusedEngine, ModelBatch, optim

    slots, threads = fast_path.STRIDED_GEMM_MIN_SLOTS, torch.get_num_threads()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)

    def make(i: int) -> nn.Module:
        torch.manual_seed(i)
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))

    def train(min_slots: int) -> tuple[list[torch.Tensor], int, ModelBatch]:
        monkeypatch.setattr(fast_path, "STRIDED_GEMM_MIN_SLOTS", min_slots)
        calls = []
        real = strided_gemm.bmm_into
        monkeypatch.setattr(strided_gemm, "bmm_into", lambda *a, **k: calls.append(1) or real(*a, **k))
        mb = ModelBatch([make(i) for i in range(slots)])
        engine = FusedEngine(mb, optim.Adam(mb, lr=[1e-3 * (1 + i) for i in range(slots)]), F.cross_entropy)
        for _ in range(3):
            engine.train_step(x, y)
        return [p.detach().clone() for p in mb.parameters()], len(calls), mb

    torch.set_num_threads(2)
    try:
        batched, batched_calls, mb = train(slots)
        per_slot, per_slot_calls, _ = train(1 << 30)
    finally:
        torch.set_num_threads(threads)
    assert batched_calls > 0 and per_slot_calls == 0
    assert all(torch.equal(a, b) for a, b in zip(batched, per_slot))
    alone = make(3)
    opt = torch.optim.Adam(alone.parameters(), lr=4e-3)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(alone(x), y).backward()
        opt.step()
    for a, b in zip(mb.slot_module(3, make(0)).parameters(), alone.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_operator_imports_no_dynamo():
    """A custom op made by ``torch.library.custom_op`` imports torch._dynamo on its first call (1.4 s at a
    host's first attach, session 38); this one, defined with ``torch.library.Library``, does not."""
    import subprocess
    import sys

    code = ("import sys, torch\nfrom ray_modelbatch import strided_gemm\nout = torch.zeros(4, 3, 2)\n"
            "assert strided_gemm.bmm_into(out, torch.randn(4, 3, 5), torch.randn(4, 5, 2))\n"
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
