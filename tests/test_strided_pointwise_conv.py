"""ray_modelbatch.strided_pointwise_conv: torch's strided 1x1 convolution, forward, backward and twice."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import strided_pointwise_conv as spc
from test_direct_conv import calls_of, steps_match_solo

CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def grads(fn, x, w, b, gy):
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    y = fn(x, w, b)
    return y, torch.autograd.grad(y, inputs, gy)


def assert_torchs(got, want, threads):
    """The bit at two threads; at one, where oneDNN adds in other orders, within 4 ulps of the largest value."""
    if threads > 1:
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=0, atol=4 * torch.finfo(want.dtype).eps * float(want.abs().max()))


@pytest.fixture(params=[1, 2])
def threads(request):
    """One torch thread (a slot host's on a 2-core node) and two: oneDNN adds in other orders at each."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,stride,groups,fmt", [
    ((4, 16, 16, 16), (2, 2), 2, torch.channels_last),   # a fused ResNet shortcut: 2 slots of 8 channels
    ((3, 6, 15, 9), (2, 3), 3, torch.channels_last),     # odd sizes, unequal strides
    ((2, 4, 7, 8), (1, 2), 1, torch.contiguous_format),  # NCHW, one stride of 1
    ((2, 6, 11), (3,), 2, torch.contiguous_format),      # Conv1d
    ((2, 4, 5, 6, 7), (2, 2, 2), 2, torch.channels_last_3d),  # Conv3d
])
@pytest.mark.parametrize("bias", [True, False])
def test_output_and_gradients_are_torchs(dtype, shape, stride, groups, fmt, bias, threads):
    torch.manual_seed(0)
    spatial = len(shape) - 2
    x = torch.randn(*shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(shape[1] * 2, shape[1] // groups, *[1] * spatial, dtype=dtype)
    w = w.contiguous(memory_format=fmt).requires_grad_()
    b = torch.randn(shape[1] * 2, dtype=dtype, requires_grad=True) if bias else None
    assert spc.applies(x, w, stride, 0, False)
    want_y, want = grads(lambda x, w, b: CONV[x.dim()](x, w, b, stride, 0, 1, groups), x, w, b,
                         gy := torch.randn_like(CONV[x.dim()](x, w, b, stride, 0, 1, groups)))
    got_y, got = grads(lambda x, w, b: spc.conv(x, w, b, stride, groups), x, w, b, gy)
    # The same products of the same values, added in the same order where oneDNN's strided and unstrided
    # kernels do (two threads on the EPYCs and Xeon measured: the output is the bit); at one thread they
    # add in other orders, a few ulps apart (see the module docstring).
    eps = torch.finfo(dtype).eps
    assert_torchs(got_y, want_y, threads)
    if x.dim() == 4 or threads > 1:  # (torch's own 3-d output format at one thread varies with the dtype)
        assert got_y.is_contiguous(memory_format=fmt) == want_y.is_contiguous(memory_format=fmt)
    # The weight gradient: the same products; bitwise on an AVX2 EPYC, while on an AVX-512 Xeon oneDNN's strided
    # kernel adds the positions in another order (up to 5 ulps of the largest value: see the module docstring).
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=8 * eps * want[1].abs().max())
    if bias:  # a plain sum of the output gradient
        assert_torchs(got[2], want[2], threads)
    # The input gradient: the same products, but oneDNN's strided kernel adds the output channels in another
    # order at some shapes (2-channel groups here: 1 ulp off); at a fused ResNet's shortcut it was the bit on
    # the EPYC.
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=4 * torch.finfo(dtype).eps * want[0].abs().max())
    assert got[0].is_contiguous(memory_format=fmt)  # the next layer's backward keeps its layout


def test_an_input_without_a_gradient_gets_none_and_the_weight_its_own(threads):
    x = torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)
    w = torch.randn(8, 4, 1, 1, requires_grad=True)
    (gw,) = torch.autograd.grad(spc.conv(x, w, None, (2, 2), 1).sum(), [w])
    (want,) = torch.autograd.grad(F.conv2d(x, w, None, 2).sum(), [w])
    assert_torchs(gw, want, threads)


def test_second_derivatives_are_torchs():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w, b: spc.conv(x, w, b, (2, 2), 2), (x, w, b))

    def penalty(fn):  # a gradient penalty: the squared input gradient, differentiated once more
        (gx,) = torch.autograd.grad(fn(x, w, b).square().sum(), [x], create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [x, w, b])

    for g, h in zip(penalty(lambda x, w, b: spc.conv(x, w, b, (2, 2), 2)),
                    penalty(lambda x, w, b: F.conv2d(x, w, b, 2, 0, 1, 2))):
        assert torch.allclose(g, h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel,stride,padding,transposed", [
    (3, (2, 2), 0, False), (1, (1, 1), 0, False), (1, (2, 2), 1, False), (1, (2, 2), 0, True), (1, (2, 2), "same", False),
])
def test_other_convolutions_are_not_taken(kernel, stride, padding, transposed):
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(4, 4, kernel, kernel)
    assert not spc.applies(x, w, stride, padding, transposed)
    assert not spc.applies(x.half(), w.half(), (2, 2), 0, False)


class Shortcut(nn.Module):
    """A ResNet block's downsampling shortcut: 1x1 stride-2 convolution and BatchNorm, beside a 3x3 stride-2 path."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.main = nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(4, 8, 1, 2), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.fc(torch.relu(self.main(h) + self.down(h)).mean((2, 3)))


def test_a_fused_shortcut_runs_here_and_trains_like_each_model_alone(monkeypatch):
    calls = calls_of(monkeypatch, spc, "conv")
    torch.manual_seed(0)
    models = [Shortcut() for _ in range(3)]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    assert mb.uses_direct_path
    x, y = torch.randn(6, 1, 9, 9), torch.randint(0, 3, (6,))
    steps_match_solo(mb, models, x, y, 4, "SGD", lr=0.1, momentum=0.9)
    assert calls, "the shortcut did not take the strided 1x1 kernel"
