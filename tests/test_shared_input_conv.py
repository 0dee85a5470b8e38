"""ray_modelbatch.shared_input_conv: the first convolution of a batch every slot shares, its weight gradient as
one batched GEMM over the im2col rows: torch's values, as close to fp64, twice, and a fused CNN trains as alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import shared_input_conv as sic
from test_direct_conv import calls_of, steps_match_solo

CL = torch.channels_last


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("channels,out,kernel,stride,padding,dilation,side", [
    (1, 24, 3, 1, 1, 1, 28),   # 8 slots of a 28x28 CNN's first layer (784 positions per image: several pieces)
    (1, 12, 5, 1, 2, 1, 13),   # LeNet-style 5x5, an odd side
    (3, 8, 3, 2, 1, 1, 15),    # RGB, strided
    (2, 6, 3, 1, 2, 2, 11),    # dilated
])
@pytest.mark.parametrize("bias", [True, False])
def test_output_and_gradients_are_torchs(dtype, rtol, channels, out, kernel, stride, padding, dilation, side, bias,
                                        monkeypatch):
    monkeypatch.setattr(sic, "MIN_OUTPUT", 0)  # small shapes, taken here to check the arithmetic
    torch.manual_seed(0)
    x = torch.randn(9, channels, side, side, dtype=dtype).contiguous(memory_format=CL)
    w = torch.randn(out, channels, kernel, kernel, dtype=dtype).contiguous(memory_format=CL).requires_grad_()
    b = torch.randn(out, dtype=dtype, requires_grad=True) if bias else None
    args = ((stride, stride), (padding, padding), (dilation, dilation))
    assert sic.applies(x, w, 1, args[1], False)
    want_y = F.conv2d(x, w, b, *args)
    got_y = sic.conv(x, w, b, *args)
    assert torch.equal(got_y, want_y)  # the same forward
    gy = torch.randn_like(want_y)
    params = [t for t in (w, b) if t is not None]
    for g, h in zip(torch.autograd.grad(got_y, params, gy), torch.autograd.grad(want_y, params, gy)):
        torch.testing.assert_close(g, h, rtol=rtol, atol=rtol * h.abs().max().item())


def test_the_weight_gradient_is_as_close_to_fp64_as_torchs():
    torch.manual_seed(1)
    x = torch.randn(64, 1, 28, 28).contiguous(memory_format=CL)
    w = torch.randn(64, 1, 3, 3).contiguous(memory_format=CL).requires_grad_()
    b = torch.randn(64, requires_grad=True)
    gy = torch.randn(64, 64, 28, 28).contiguous(memory_format=CL)
    ours = torch.autograd.grad(sic.conv(x, w, b, (1, 1), (1, 1), (1, 1)), [w, b], gy)
    torchs = torch.autograd.grad(F.conv2d(x, w, b, 1, 1), [w, b], gy)
    w64, b64 = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    exact = torch.autograd.grad(F.conv2d(x.double(), w64, b64, 1, 1), [w64, b64], gy.double())
    for o, t, e in zip(ours, torchs, exact):
        scale = e.abs().max()
        assert (o.double() - e).abs().max() / scale <= max(2 * (t.double() - e).abs().max() / scale, 1e-6)


def test_second_derivatives_are_torchs():
    torch.manual_seed(2)
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64).contiguous(memory_format=CL)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda w, b: sic.conv(x, w, b, (1, 1), (1, 1), (1, 1)).square(), (w, b))


def test_a_small_output_keeps_torch_s_convolution_and_a_large_one_takes_this_one():
    """oneDNN's weight gradient is fast for a small output and slow for a large one (module docstring)."""
    x = torch.randn(16, 1, 32, 32).contiguous(memory_format=CL)
    assert not sic.applies(x, torch.randn(6, 1, 5, 5), 1, (0, 0), False)  # a one-trial CIFAR tutorial stack
    x = torch.randn(64, 1, 28, 28).contiguous(memory_format=CL)
    assert sic.applies(x, torch.randn(192, 1, 3, 3), 1, (1, 1), False)  # 12 slots of 16 channels
    assert not sic.applies(x, torch.randn(192, 1, 3, 3), 1, (1, 1), False, stride=(2, 2))  # a quarter of it


def test_other_convolutions_are_not_taken(monkeypatch):
    monkeypatch.setattr(sic, "MIN_OUTPUT", 0)
    x = torch.randn(2, 1, 6, 6).contiguous(memory_format=CL)
    w = torch.randn(8, 1, 3, 3)
    assert sic.applies(x, w, 1, (1, 1), False)
    assert not sic.applies(x.clone().requires_grad_(), w, 1, (1, 1), False)  # an input with a gradient
    assert not sic.applies(x.expand(2, 2, 6, 6).contiguous(memory_format=CL), torch.randn(8, 1, 3, 3), 2, (1, 1),
                           False)  # grouped
    assert not sic.applies(torch.randn(2, 4, 6, 6).contiguous(memory_format=CL), torch.randn(8, 4, 3, 3), 1, (1, 1),
                           False)  # 36 values per im2col row
    assert not sic.applies(x, w, 1, "same", False)
    assert not sic.applies(x, w, 1, (1, 1), True)
    assert not sic.applies(x.half(), w.half(), 1, (1, 1), False)


class FirstLayerCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 3, 3, padding=1), nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def test_a_fused_cnn_on_one_shared_batch_takes_it_and_trains_like_each_model_alone(monkeypatch):
    monkeypatch.setattr(sic, "MIN_OUTPUT", 0)  # a small CNN, taken here to check the plan's use of it
    calls = calls_of(monkeypatch, sic, "conv")
    torch.manual_seed(3)
    models = [FirstLayerCNN() for _ in range(4)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    assert mb.uses_direct_path
    steps_match_solo(mb, models, torch.randn(10, 1, 8, 8), torch.randint(0, 4, (10,)), 4, "SGD", lr=0.1)
    assert calls, "the shared first layer did not take the GEMM weight gradient"
