"""channels_last_batch_norm: torch's BatchNorm values and gradients, its sums taken in pieces."""

import torch
import torch.nn.functional as F

from ray_modelbatch import channels_last_batch_norm as clbn


def _input(b=16, c=6, h=10, w=12, seed=0, mean=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, h, w, generator=g) + mean).contiguous(memory_format=torch.channels_last)


def test_pieces_are_the_fewest_divisors_that_keep_each_short():
    assert clbn.pieces(16384) == 64
    assert clbn.pieces(4096) == 16
    assert clbn.pieces(256) == 1 and clbn.pieces(100) == 1
    assert clbn.pieces(1920) == 8  # 240 values each
    assert clbn.pieces(257) == 1  # a prime above PIECE: no piece fits, and the only divisor is 1
    assert clbn.pieces(3 * 2**20) == clbn.MAX_PIECES  # too long for MAX_PIECES of PIECE: the most pieces


def test_applies_only_to_batch_statistics_of_channels_last_fp32_cpu_input():
    x = _input()
    assert clbn.applies(x, True) == clbn.pieces(16 * 10 * 12)
    assert clbn.applies(x, False) == 0  # running statistics: torch's kernel
    assert clbn.applies(x.contiguous(), True) == 0  # NCHW: torch's kernel sums in pieces itself
    assert clbn.applies(x.double(), True) == 0
    assert clbn.applies(_input(b=2, h=8, w=8), True) == 0  # 128 values a channel: one piece, torch's own
    assert clbn.applies(_input(c=1), True) == 0


def test_values_gradients_and_running_statistics_are_torchs():
    x = _input().requires_grad_()
    w = torch.rand(6, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    rm, rv = torch.randn(6), torch.rand(6) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    k = clbn.applies(x, True)
    out = clbn.batch_norm(x, w, b, rm, rv, 0.1, 1e-5, k)
    assert out.is_contiguous(memory_format=torch.channels_last)
    go = _input(seed=1)
    got = torch.autograd.grad(out, (x, w, b), go)

    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    rm64, rv64 = rm_ref.double(), rv_ref.double()
    ref = F.batch_norm(x64, rm64, rv64, w64, b64, True, 0.1, 1e-5)
    want = torch.autograd.grad(ref, (x64, w64, b64), go.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rm.double(), rm64, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv.double(), rv64, rtol=1e-6, atol=1e-6)


def test_sums_in_pieces_are_closer_to_fp64_than_one_running_sum():
    """The reason the module exists: on many values per channel, torch's channels-last kernel is further
    from fp64 than these pieces are."""
    x = _input(b=64, c=4, h=16, w=16, mean=3.0).requires_grad_()
    go = _input(b=64, c=4, h=16, w=16, seed=2)
    ours = torch.autograd.grad(clbn.batch_norm(x, None, None, None, None, 0.1, 1e-5, clbn.applies(x, True)), x, go)[0]
    torchs = torch.autograd.grad(F.batch_norm(x, None, None, None, None, True, 0.1, 1e-5), x, go)[0]
    x64 = x.detach().double().requires_grad_()
    exact = torch.autograd.grad(F.batch_norm(x64, None, None, None, None, True, 0.1, 1e-5), x64, go.double())[0]
    ours_err = float((ours.double() - exact).abs().max())
    torchs_err = float((torchs.double() - exact).abs().max())
    assert ours_err < torchs_err, (ours_err, torchs_err)


def test_second_derivatives_are_torchs():
    x = _input(b=4, c=3, h=10, w=10).double().contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    out = clbn.batch_norm(x, w, None, None, None, 0.1, 1e-5, 4)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    got = torch.autograd.grad(gx.square().sum(), w)[0]
    ref_out = F.batch_norm(x, None, None, w, None, True, 0.1, 1e-5)
    (rgx,) = torch.autograd.grad(ref_out.square().sum(), x, create_graph=True)
    want = torch.autograd.grad(rgx.square().sum(), w)[0]
    torch.testing.assert_close(got, want)
