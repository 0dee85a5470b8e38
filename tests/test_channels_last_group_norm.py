"""ray_modelbatch.channels_last_group_norm: torch's GroupNorm, forward, backward and twice, on channels-last input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import channels_last_group_norm as cgn
from test_direct_conv import NormCNN, directly_trains_like_solo_modules


def channels_last(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 3.0,
                  shift: float = 2.0) -> torch.Tensor:
    # An offset mean: the variance must not come from E[x^2] - E[x]^2 of large values.
    return (torch.randn(*shape, dtype=dtype) * scale + shift).to(memory_format=torch.channels_last)


def grads(fn, x, weight, bias, gy, **kw):
    inputs = [t for t in (x, weight, bias) if t is not None]
    y = fn(x, kw["groups"], weight, bias, kw.get("eps", 1e-5))
    return y, torch.autograd.grad(y, inputs, gy)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
@pytest.mark.parametrize("shape,groups", [((6, 12, 5, 7), 3), ((1, 8, 4, 4), 1), ((3, 8, 2, 3), 8), ((2, 64, 9, 9), 16)])
@pytest.mark.parametrize("affine", [True, False])
def test_output_and_gradients_match_torch(dtype, tol, shape, groups, affine):
    torch.manual_seed(0)
    x = channels_last(*shape, dtype=dtype).requires_grad_()
    weight = torch.randn(shape[1], dtype=dtype, requires_grad=True) if affine else None
    bias = torch.randn(shape[1], dtype=dtype, requires_grad=True) if affine else None
    gy = torch.randn(*shape, dtype=dtype)
    assert cgn.applies(x, groups)
    want_y, want = grads(F.group_norm, x, weight, bias, gy, groups=groups)
    got_y, got = grads(cgn.group_norm, x, weight, bias, gy, groups=groups)
    assert got_y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got_y, want_y, rtol=tol, atol=tol)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * float(w.abs().max()))


def test_a_constant_group_and_a_large_mean():
    """A group of equal values (variance 0: the output is the bias) and a mean 1e3 times the spread, against
    fp64. (torch's own channels-last kernel is off by 0.06 here, its NCHW kernel by 1.4e-5.)"""
    torch.manual_seed(0)
    x = channels_last(2, 4, 3, 3, scale=1.0, shift=1e3)
    x[0, :2] = 5.0  # sample 0, group 0 (2 groups of 2 channels): constant
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    weight, bias = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    gy = torch.randn(2, 4, 3, 3)
    want_y, want = grads(F.group_norm, *(t.double() for t in (x, weight, bias, gy)), groups=2)
    got_y, got = grads(cgn.group_norm, x, weight, bias, gy, groups=2)
    torch.testing.assert_close(got_y.double(), want_y, rtol=0, atol=2e-4)  # values of 1e3: fp32's step is 6e-5
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=2e-3 * float(w.abs().max()))


def test_only_the_gradients_asked_for():
    """x and bias without gradients (a frozen input, a fixed bias): the weight's gradient alone, torch's."""
    x = channels_last(2, 6, 3, 3)
    weight, bias = torch.randn(6, requires_grad=True), torch.randn(6)
    gy = torch.randn(2, 6, 3, 3)
    (got,) = torch.autograd.grad(cgn.group_norm(x, 3, weight, bias), [weight], gy)
    # Against NCHW: torch's channels-last backward crashes the process (segfault, torch 2.13) when only the
    # weight needs a gradient.
    (want,) = torch.autograd.grad(F.group_norm(x.contiguous(), 3, weight, bias), [weight], gy)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6 * float(want.abs().max()))


def test_second_derivatives_are_torchs():
    """A gradient penalty through the layer: create_graph=True differentiates torch's own op."""
    torch.manual_seed(1)
    x = channels_last(3, 8, 4, 4, dtype=torch.float64).requires_grad_()
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    out = []
    for fn in (F.group_norm, cgn.group_norm):
        g = torch.autograd.grad(fn(x, 4, weight, bias, 1e-5), [x, weight], gy, create_graph=True)
        penalty = sum(t.square().sum() for t in g)
        out.append(torch.autograd.grad(penalty, [x, weight, bias], allow_unused=True))
    for got, want in zip(out[1], out[0]):
        assert (got is None) == (want is None)
        if want is not None:
            torch.testing.assert_close(got, want)


def test_second_derivatives_are_accurate_for_a_large_mean():
    """The double-backward fallback differentiates torch's NCHW kernel: its channels-last one takes the variance
    from large squares (module docstring), which a mean 1,000 times the spread turns into errors of percents."""
    torch.manual_seed(3)
    x = channels_last(2, 6, 3, 3, scale=1.0, shift=1e3).requires_grad_()
    weight = torch.randn(6, requires_grad=True)
    gy = torch.randn(2, 6, 3, 3)
    out = []
    for fn, args in ((F.group_norm, [t.double() for t in (x, weight, gy)]), (cgn.group_norm, [x, weight, gy])):
        xx, ww, g_ = args
        gx, gw = torch.autograd.grad(fn(xx, 3, ww, None, 1e-5), [xx, ww], g_, create_graph=True)
        out.append(torch.autograd.grad(gx.square().sum() + gw.square().sum(), [xx, ww]))
    for got, want in zip(out[1], out[0]):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-2 * float(want.abs().max()))


def test_calls_it_leaves_to_torch():
    x = channels_last(2, 8, 3, 3)
    assert cgn.applies(x, 4)
    assert not cgn.applies(x.contiguous(), 4)  # NCHW: torch's kernel is fast there
    assert not cgn.applies(x, 3)  # channels not divisible by the groups: torch's error
    assert not cgn.applies(torch.randn(2, 8, 5), 4)  # not 4-d
    assert not cgn.applies(x.to(torch.bfloat16), 4)
    assert not cgn.applies(torch.empty(2, 8, 3, 3, device="meta").to(memory_format=torch.channels_last), 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not cgn.applies(x, 4)


def test_a_fused_cnn_routes_its_group_and_instance_norms_here_and_trains_like_each_model_alone(monkeypatch):
    calls = []
    real = cgn.group_norm

    def spy(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(cgn, "group_norm", spy)
    directly_trains_like_solo_modules(NormCNN, per_slot=False, steps=5, seed=4)
    # 3 slots of 8 channels, one call for all of them: the GroupNorm and the InstanceNorm2d of each step
    # (not the InstanceNorm1d: 3-d input keeps torch's kernel), and each once more in the evaluation.
    assert calls == [(8, 24, 8, 8), (8, 24, 4, 4)] * 5 + [(4, 24, 8, 8), (4, 24, 4, 4)]


def test_a_fused_group_norm_cnn_evaluates_like_each_model(monkeypatch):
    """Evaluation with each slot's own weights goes through the kernel too, and gives each model's outputs."""
    calls = []
    real = cgn.group_norm
    monkeypatch.setattr(cgn, "group_norm", lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k))
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 4))
    models = [copy.deepcopy(model) for _ in range(4)]
    for m in models[1:]:
        for p in m.parameters():
            p.data.add_(torch.randn_like(p) * 0.1)
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models]).eval()
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        out = mb(x)
    assert calls == [(5, 4 * 8, 6, 6)]
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m.eval()(x), rtol=1e-5, atol=1e-5)
