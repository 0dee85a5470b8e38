"""benchmarks/strided_conv.py: its phase-by-phase input gradient is a strided convolution's, at every kind of shape."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import strided_conv  # noqa: E402

CL = torch.channels_last


@pytest.mark.parametrize("shape,out_channels,kernel,stride,padding,groups", [
    ((4, 16, 16, 16), 32, 3, 2, 1, 2),        # the small ResNet's downsampling 3x3, 2 slots
    ((3, 6, 11, 13), 6, 3, 2, 1, 3),          # odd sizes: phases of unequal length
    ((2, 4, 12, 12), 8, 5, 2, 2, 1),          # 5x5
    ((2, 4, 13, 13), 8, 3, 3, 0, 2),          # stride 3
    ((2, 6, 9, 14), 6, (3, 5), (2, 3), (1, 0), 3),  # unequal kernel, stride and padding per dimension
    ((2, 4, 10, 10), 4, 3, 4, 1, 1),          # stride above the kernel: positions no tap reads
    ((1, 2, 5, 5), 2, 3, 2, 3, 1),            # padding as wide as the kernel
])
def test_the_phase_form_is_torchs_input_gradient(shape, out_channels, kernel, stride, padding, groups):
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=CL).requires_grad_()
    w = torch.randn(out_channels, shape[1] // groups, *pair(kernel), dtype=torch.float64).contiguous(memory_format=CL)
    y = F.conv2d(x, w, None, stride, padding, 1, groups)
    gy = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, [x], gy)
    got = strided_conv.input_gradient(gy, w, x.shape, pair(stride), pair(padding), groups)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert got.is_contiguous(memory_format=CL)
