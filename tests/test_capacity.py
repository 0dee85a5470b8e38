"""Slot capacity (profile + line fit) and the out-of-memory fallback of a stack's fused step.

Pure torch: stacks are built directly, no Ray runtime (importing the tune
package imports the ray library, but nothing here starts Ray).
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import optim
from ray_modelbatch import capacity
from ray_modelbatch.capacity import MiB, fit_capacity, measure_step_memory, memory_in_use, profile_capacity
from ray_modelbatch.data import PerSlotStreams
from ray_modelbatch.errors import OutOfDeviceMemoryError
from ray_modelbatch.tune.spec import SlotSpec
from ray_modelbatch.slot_group import SlotGroup as Stack, stack_key


# ------------------------------------------------------------------ fit_capacity
def test_fit_gives_the_line_and_the_slots_that_fit():
    pts = [(2, 100 * MiB + 2 * 10 * MiB), (8, 100 * MiB + 8 * 10 * MiB)]
    fit = fit_capacity(pts, budget_bytes=1000 * MiB, max_slots=1024)
    assert (fit.per_slot_bytes, fit.fixed_bytes, fit.budget_bytes) == (10 * MiB, 100 * MiB, 1000 * MiB)
    assert fit.slots == 90  # (1000 - 100) / 10
    assert "90 slots" in fit.describe() and "10.0 MiB per slot" in fit.describe()


def test_fit_is_least_squares_and_caps_at_max_slots():
    # Noisy points around 5 + 3 S (MiB): the least-squares line is 4.5 + 3.3 S.
    fit = fit_capacity([(1, 8 * MiB), (2, 11 * MiB), (3, 14 * MiB), (4, 18 * MiB)], 1000 * MiB, max_slots=1024)
    assert fit.per_slot_bytes == pytest.approx(3.3 * MiB, abs=1)
    assert fit.fixed_bytes == pytest.approx(4.5 * MiB, abs=1)
    assert fit.slots == 301  # (1000 - 4.5) / 3.3 = 301.7
    assert fit_capacity([(2, 20), (8, 80)], budget_bytes=10**9, max_slots=64).slots == 64


def test_fit_clamps_a_noisy_slope_to_one_byte():
    fit = fit_capacity([(2, 5000), (8, 4000)], budget_bytes=10_000, max_slots=10**6)
    assert fit.per_slot_bytes == 1
    assert fit.slots == 10_000 - fit.fixed_bytes


def test_fit_when_not_one_slot_fits_says_how_much_is_missing_and_what_to_do():
    pts = [(2, 100 * MiB + 2 * 10 * MiB), (8, 100 * MiB + 8 * 10 * MiB)]
    with pytest.raises(OutOfDeviceMemoryError) as info:
        fit_capacity(pts, budget_bytes=105 * MiB, max_slots=8, device="cuda:0")
    msg = str(info.value)
    assert "110.0 MiB" in msg and "105.0 MiB" in msg and "cuda:0" in msg
    assert "batch_size" in msg and "more memory" in msg


# ------------------------------------------------------------ measuring memory
def test_cpu_peak_is_reset_per_measurement():
    def build(n):
        def run():
            torch.ones(n * 2**20 // 4).add_(1)  # n MiB, touched

        return run

    big = torch.ones(192 * 2**20 // 4)  # a higher earlier peak must not count
    del big
    got = measure_step_memory(build, 64, "cpu", baseline=memory_in_use("cpu"))
    assert 60 * MiB <= got < 140 * MiB


def _spec(**kw) -> SlotSpec:
    kw.setdefault("batch_size", 32)
    return SlotSpec(model=lambda cfg: None, optimizer=optim.Adam, hparams=lambda cfg: {}, loss=F.cross_entropy,
                    data=lambda: None, **kw)


def _data(n=256, d=32, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y, x[:64], y[:64]


def _mlp(hidden, d=32, classes=5, bn=False):
    # No bias before BatchNorm: BN cancels it, so its gradient is rounding noise, which Adam turns
    # into lr-sized steps that depend on how a kernel rounds (chunked or not).
    layers = [nn.Linear(d, hidden, bias=not bn)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def test_profile_capacity_on_cpu_grows_with_the_model():
    data = _data()
    fits = {}
    for hidden in (256, 1024):
        build = Stack.build_for_profile(_spec(), lambda h=hidden: _mlp(h), data, "cpu")
        fits[hidden] = profile_capacity(build, "cpu", points=(2, 8))
    small, big = fits[256], fits[1024]
    param_bytes = sum(p.numel() for p in _mlp(1024).parameters()) * 4
    # Adam keeps parameters, gradients and two moments per slot.
    assert big.per_slot_bytes >= 3 * param_bytes
    assert big.per_slot_bytes > 4 * small.per_slot_bytes  # 4x hidden: ~16x the 1024x1024 layer
    assert small.slots >= 1 and big.slots >= 1 and big.slots <= small.slots


# ------------------------------------------------------------ throughput cap
def _timed_build(monkeypatch, seconds_per_step, oom_above=None):
    """A fake ``build``: a step of S slots advances a fake clock by ``seconds_per_step(S)``; builds are logged."""
    clock, built = [0.0], []
    monkeypatch.setattr(capacity, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))  # this module's only

    def build(slots):
        built.append(slots)
        if oom_above is not None and slots > oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

        def step():
            clock[0] += seconds_per_step(slots)

        return step

    return build, built


def test_throughput_cap_keeps_the_largest_stack_near_the_best_rate(monkeypatch):
    # A conv net on a CPU: 1 ms per slot up to 32 slots, 4 ms per slot beyond (activations out of cache)
    build, built = _timed_build(monkeypatch, lambda s: s * (1e-3 if s <= 32 else 4e-3))
    slots, rates, stopped = capacity.cap_by_throughput(build, "cpu", 300, budget_s=None)
    assert slots == 32 and stopped == ""
    assert [s for s, _ in rates] == [8, 32, 128] and built == [8, 32, 128]  # 512 and 300 never built
    assert dict(rates)[32] == pytest.approx(1000.0) and dict(rates)[128] == pytest.approx(250.0)


def test_throughput_cap_takes_every_slot_memory_allows_while_the_rate_holds(monkeypatch):
    # A small MLP: 2 ms of fixed cost per step, then 0.01 ms per slot: the rate keeps rising
    build, _ = _timed_build(monkeypatch, lambda s: 2e-3 + s * 1e-5)
    slots, rates, _ = capacity.cap_by_throughput(build, "cpu", 300)
    assert slots == 300 and [s for s, _ in rates] == [8, 32, 128, 300]
    # a flat rate (a GPU that is busy at any size) also takes the larger stack: more trials at once
    build, _ = _timed_build(monkeypatch, lambda s: s * 1e-3)
    assert capacity.cap_by_throughput(build, "cpu", 100)[0] == 100
    # fewer slots than the smallest point: only that count is timed
    build, built = _timed_build(monkeypatch, lambda s: s * 1e-3)
    assert capacity.cap_by_throughput(build, "cpu", 5) == (5, ((5, pytest.approx(1000.0)),), "") and built == [5]


def test_throughput_cap_skips_a_stack_whose_timing_would_overrun_the_budget(monkeypatch):
    # Tune's CIFAR CNN on one CPU thread: about 20 ms per slot-step at any size, so 4 steps of 128 slots take
    # ~10 s and of 256 ~20 s (93 s to profile in all, before the host's first trial)
    build, built = _timed_build(monkeypatch, lambda s: s * 0.02)
    slots, rates, stopped = capacity.cap_by_throughput(build, "cpu", 256, budget_s=5.0)
    assert built == [8, 32] and [s for s, _ in rates] == [8, 32] and slots == 32  # 0.64 + 2.56 s timed
    assert stopped.startswith("128 slots not timed: about 10.2 s more, over the profile's 5 s budget"), stopped
    # without a budget it times them all (the rate holds)
    build, built = _timed_build(monkeypatch, lambda s: s * 0.02)
    assert capacity.cap_by_throughput(build, "cpu", 256, budget_s=None)[0] == 256 and built == [8, 32, 128, 256]
    # the first point is timed whatever its cost
    build, built = _timed_build(monkeypatch, lambda s: s * 1.0)
    assert capacity.cap_by_throughput(build, "cpu", 256, budget_s=5.0)[:1] == (8,) and built == [8]


def test_throughput_cap_stops_at_a_stack_that_runs_out_of_memory(monkeypatch):
    build, _ = _timed_build(monkeypatch, lambda s: 2e-3 + s * 1e-5, oom_above=64)
    assert capacity.cap_by_throughput(build, "cpu", 300)[0] == 32
    build, _ = _timed_build(monkeypatch, lambda s: 1e-3, oom_above=4)
    with pytest.raises(OutOfDeviceMemoryError, match="explicit slots_per_host"):
        capacity.cap_by_throughput(build, "cpu", 300)


def test_profile_capacity_with_throughput_points_times_real_stacks():
    build = Stack.build_for_profile(_spec(), lambda: _mlp(32), _data(), "cpu")
    fit = profile_capacity(build, "cpu", points=(2, 8), max_slots=40, throughput_points=(8, 32))
    assert fit.memory_slots == 40 and [s for s, _ in fit.throughput] in ([8], [8, 32], [8, 32, 40])
    assert fit.slots in {s for s, _ in fit.throughput} and all(r > 0 for _, r in fit.throughput)
    assert "memory allows 40, model-steps/s by slots 8: " in fit.describe()


# ----------------------------------------------------------- out-of-memory fallback
def _stack(n=6, bn=False, data_mode="per_slot"):
    torch.manual_seed(0)
    models = [_mlp(16, bn=bn) for _ in range(n)]
    st = Stack(_spec(data_mode=data_mode, batch_size=8), stack_key(models[0]), models[0], _data(), n,
               torch.device("cpu"))
    for i, m in enumerate(models):
        st.add(f"t{i}", m, seed=100 + i, hparams={"lr": 1e-3 * (i + 1)})
    return st


def test_spec_cpu_gemm_is_checked_and_reaches_the_stack():
    with pytest.raises(ValueError, match="cpu_gemm must be 'blas' or 'onednn', got 'mkl'"):
        _spec(cpu_gemm="mkl")
    model = _mlp(16)
    st = Stack(_spec(cpu_gemm="onednn", batch_size=8), stack_key(model), model, _data(), 2, torch.device("cpu"))
    assert st.mb.cpu_gemm == "onednn"


def _oom_when_more_than(limit, count, exc=torch.OutOfMemoryError):
    def check(n):
        count.append(n)
        if n > limit:
            raise exc("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    return check


def _inject_in_engine(st, check):
    real = st.engine.train_step

    def train_step(x, y, *, slots, **kw):
        check(len(slots))
        return real(x, y, slots=slots, **kw)

    st.engine.train_step = train_step


def _inject_after_forward(st, check):
    """Fail after the real forward ran, i.e. after BatchNorm statistics were updated in place."""
    real = st.mb.forward_loss

    def forward_loss(*a, slots=None, **kw):
        out = real(*a, slots=slots, **kw)
        check(st.mb.num_slots if slots is None else slots.numel())
        return out

    st.mb.forward_loss = forward_loss


def _assert_same_slots(a, b, n):
    for i in range(n):
        for k, v in a.mb.slot_state(i).items():
            torch.testing.assert_close(v, b.mb.slot_state(i)[k], rtol=1e-6, atol=1e-6, msg=f"slot {i} {k}")
        sa, sb = a.opt.slot_state(i), b.opt.slot_state(i)
        assert sa["steps"] == sb["steps"], f"slot {i} step count"
        for dt, st in sa["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(v, sb["state"][dt][k], rtol=1e-6, atol=1e-6, msg=f"slot {i} {k}")
        if isinstance(a.streams, PerSlotStreams):
            sa, sb = a.streams.slot_state(i), b.streams.slot_state(i)
            assert sa.keys() == sb.keys() and all(_same(sa[k], sb[k]) for k in sa), f"slot {i} data stream"


def _same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("where", ["engine", "after_forward"])
def test_chunked_step_gives_every_slot_the_unchunked_result(where, caplog):
    ref, st = _stack(bn=True), _stack(bn=True)
    calls: list[int] = []
    (_inject_in_engine if where == "engine" else _inject_after_forward)(st, _oom_when_more_than(2, calls))
    schedule = [list(range(6))] * 3 + [[5, 1, 3], list(range(6))]  # a subset, out of order
    with caplog.at_level(logging.WARNING, logger="ray_modelbatch.slot_group"):
        for step, slots in enumerate(schedule):
            want, got = ref.train_step(slots), st.train_step(slots)
            assert got.slots.tolist() == slots
            for f in ("losses", "grad_norm", "updated", "nonfinite"):
                torch.testing.assert_close(getattr(got, f), getattr(want, f), rtol=1e-6, atol=1e-6)
            if step == 0:
                assert calls == [6, 3, 2, 2, 2]  # halved twice, then three chunks of 2
                assert st.max_chunk == 2
    assert len([r for r in caplog.records if "ran out of memory" in r.getMessage()]) == 2  # once per reduction
    assert max(calls[5:]) <= 2  # later steps start at the reduced size
    assert [int(s) for s in st.opt.steps] == [4, 5, 4, 5, 4, 5]
    _assert_same_slots(ref, st, 6)
    want, got = ref.evaluate(list(range(6))), st.evaluate(list(range(6)))
    assert all(got[k] == pytest.approx(v, rel=1e-6) for k, v in want.items())


def test_cpu_allocator_message_counts_as_out_of_memory_in_shared_mode():
    ref, st = _stack(data_mode="shared"), _stack(data_mode="shared")
    def cpu_oom(_):
        return RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    _inject_in_engine(st, _oom_when_more_than(4, [], exc=cpu_oom))
    for _ in range(3):
        ref.train_step(list(range(6))), st.train_step(list(range(6)))
    assert st.max_chunk == 3
    _assert_same_slots(ref, st, 6)


def test_other_errors_are_not_retried():
    st = _stack()
    calls: list[int] = []
    _inject_in_engine(st, _oom_when_more_than(2, calls, exc=ValueError))
    with pytest.raises(ValueError):
        st.train_step(list(range(6)))
    assert calls == [6] and st.max_chunk is None


def test_one_slot_out_of_memory_names_the_stack():
    st = _stack()
    calls: list[int] = []
    _inject_in_engine(st, _oom_when_more_than(0, calls))
    with pytest.raises(OutOfDeviceMemoryError) as info:
        st.train_step(list(range(6)))
    assert calls == [6, 3, 2, 1]
    msg = str(info.value)
    assert st.key in msg and "cpu" in msg and "6 slots attached" in msg and "batch_size" in msg
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert [int(s) for s in st.opt.steps] == [0] * 6  # no slot stepped


def test_out_of_memory_inside_the_optimizer_update_is_not_retried():
    """A retry would apply the part of the update that already ran a second time."""
    st = _stack()
    real = st.opt.step

    def step(*a, **kw):
        real(*a, **kw)
        raise torch.OutOfMemoryError("CUDA out of memory (injected after the update)")

    st.opt.step = step
    with pytest.raises(OutOfDeviceMemoryError, match="optimizer update"):
        st.train_step(list(range(6)))
    assert st.max_chunk == 3  # later steps still run smaller
    assert [int(s) for s in st.opt.steps] == [1] * 6  # stepped once, not twice
