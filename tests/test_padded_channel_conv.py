"""ray_modelbatch.padded_channel_conv: a grouped convolution of 3-channel groups, its weight gradient computed
with a zero fourth channel: torch's values, forward, backward and twice, and each slot's RGB CNN trains as alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import padded_channel_conv as pcc
from test_direct_conv import calls_of, state_close

CL = torch.channels_last


def grads(fn, x, w, b, gy):
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    y = fn(x, w, b)
    return y, torch.autograd.grad(y, inputs, gy)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("groups,out,kernel,stride,padding,dilation", [
    (4, 8, 3, 1, 1, 1),   # 4 slots of a 3 -> 2 channel 3x3 layer
    (2, 6, 5, 2, 2, 1),   # a strided 5x5 stem
    (3, 3, 3, 1, 2, 2),   # dilated
])
@pytest.mark.parametrize("bias", [True, False])
def test_output_and_gradients_are_torchs(dtype, rtol, groups, out, kernel, stride, padding, dilation, bias):
    torch.manual_seed(0)
    x = torch.randn(5, 3 * groups, 11, 9, dtype=dtype).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(out, 3, kernel, kernel, dtype=dtype).contiguous(memory_format=CL).requires_grad_()
    b = torch.randn(out, dtype=dtype, requires_grad=True) if bias else None
    assert pcc.applies(x, w, groups, (padding, padding), False)
    args = ((stride, stride), (padding, padding), (dilation, dilation), groups)
    want_y, want = grads(lambda x, w, b: F.conv2d(x, w, b, *args), x, w, b,
                         gy := torch.randn_like(F.conv2d(x, w, b, *args)))
    got_y, got = grads(lambda x, w, b: pcc.conv(x, w, b, *args), x, w, b, gy)
    assert torch.equal(got_y, want_y) and torch.equal(got[0], want[0])  # the same kernels forward and for x
    for g, h in zip(got[1:], want[1:]):  # weight and bias: other sums of the same products
        torch.testing.assert_close(g, h, rtol=rtol, atol=rtol * h.abs().max().item())


def test_each_slots_weight_gradient_is_as_close_to_fp64_as_its_model_alone():
    torch.manual_seed(1)
    s, co = 6, 8
    x = torch.randn(16, 3 * s, 16, 16).contiguous(memory_format=CL)
    w = torch.randn(s * co, 3, 3, 3).contiguous(memory_format=CL).requires_grad_()
    y = pcc.conv(x, w, None, (1, 1), (1, 1), (1, 1), s)
    gy = torch.randn_like(y)
    (gw,) = torch.autograd.grad(y, w, gy)
    (exact,) = torch.autograd.grad(F.conv2d(x.double(), w.double(), None, 1, 1, 1, s), w, gy.double())
    errors = []
    for i in range(s):
        rows = slice(i * co, (i + 1) * co)
        wi = w[rows].detach().requires_grad_()
        (alone,) = torch.autograd.grad(F.conv2d(x[:, 3 * i:3 * i + 3].contiguous(memory_format=CL), wi, None, 1, 1),
                                       wi, gy[:, rows].contiguous(memory_format=CL))
        scale = exact[rows].abs().max()
        errors.append(((gw[rows] - exact[rows]).abs().max() / scale, (alone - exact[rows]).abs().max() / scale))
    ours, alone = max(e[0] for e in errors), max(e[1] for e in errors)
    assert ours <= 3 * alone, (ours.item(), alone.item())  # fp32 rounding of the same sums, not a worse method


def test_second_derivatives_are_torchs():
    torch.manual_seed(2)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w, b: pcc.conv(x, w, b, (1, 1), (1, 1), (1, 1), 2), (x, w, b))


def test_other_convolutions_are_not_taken():
    x = torch.randn(2, 6, 5, 5).contiguous(memory_format=CL)
    w = torch.randn(4, 3, 3, 3)
    assert pcc.applies(x, w, 2, (1, 1), False)
    assert not pcc.applies(x, w, 1, (1, 1), False)  # one group: torch's kernel is fast
    assert not pcc.applies(x, torch.randn(4, 2, 3, 3), 3, (1, 1), False)  # 2 channels per group
    assert not pcc.applies(x.contiguous(), w, 2, (1, 1), False)  # NCHW
    assert not pcc.applies(x, w, 2, "same", False)
    assert not pcc.applies(x, w, 2, (1, 1), True)
    assert not pcc.applies(x.half(), w.half(), 2, (1, 1), False)


class RGBNet(nn.Module):
    """A CIFAR-style start: RGB conv (its bias has a gradient: no BatchNorm right after it), pool, conv-BN."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def test_each_slots_rgb_cnn_trains_on_its_own_batches_as_alone(monkeypatch):
    calls = calls_of(monkeypatch, pcc, "conv")
    torch.manual_seed(3)
    models = [RGBNet() for _ in range(3)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    assert mb.uses_direct_path
    eng = rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=1e-2), F.cross_entropy)
    solo = [copy.deepcopy(m) for m in models]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in solo]
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        xs, ys = torch.randn(3, 8, 3, 8, 8, generator=g), torch.randint(0, 5, (3, 8), generator=g)
        eng.train_step(xs, ys, per_slot=True)
        for m, o, x, y in zip(solo, opts, xs, ys):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    assert calls, "the RGB layer did not take the padded weight gradient"
    state_close(mb, solo)
