"""``short_softmax``: torch's values forward and backward for every row length, each slot's rows in the
same bits however many slots run, and the stack's cross-entropy built on it."""

import pytest
import torch
import torch.nn.functional as F

from ray_modelbatch import short_softmax
from ray_modelbatch.slot_losses import per_slot_loss


def _tolerance(dtype):
    eps = torch.finfo(dtype).eps
    return dict(rtol=4 * eps, atol=4 * eps)  # one rounding of torch's scalar log, which its vector code may differ by


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("classes", [1, 2, 3, 7, 8, 10, 15, 16, 17, 33, 100])
def test_each_is_torch_s_forward_and_backward(classes, dtype, fn):
    torch.manual_seed(classes)
    x = (torch.randn(3, 40, classes, dtype=dtype) * 5).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    out, want = getattr(short_softmax, fn)(x), getattr(torch, fn)(ref, -1)
    torch.testing.assert_close(out, want, **_tolerance(dtype))
    g = torch.randn_like(want)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, ref.grad, **_tolerance(dtype))
    if not short_softmax.short_rows(x):
        assert torch.equal(out, want) and torch.equal(x.grad, ref.grad)  # torch's own call


@pytest.mark.parametrize("batch", [7, 16, 40])
def test_a_slot_s_rows_have_the_same_bits_however_many_slots_run(batch):
    """log_softmax's: whole-stack, masked and gathered steps of a hand-written MLP step round alike, as its
    plan promises. (softmax's kernel for another dimension blocks its loops over every row, so, as torch's
    softmax in any plan, it is not counted gather-exact.)"""
    torch.manual_seed(batch)
    x = torch.randn(6, batch, 10) * 5
    whole = short_softmax.log_softmax(x)
    for rows in ([0], [2, 5], [1, 2, 3, 4]):
        assert torch.equal(short_softmax.log_softmax(x[rows]), whole[rows])


@pytest.mark.parametrize("classes", [8, 10, 16, 40])
def test_softmax_backward_is_autograd_s_to_the_bit(classes):
    """A hand-written backward (the packed attention's) gets the bits autograd gets for :func:`softmax`."""
    torch.manual_seed(classes)
    x = torch.randn(5, 12, classes, requires_grad=True)
    out = short_softmax.softmax(x)
    g = torch.randn(5, 12, classes)
    out.backward(g)
    assert torch.equal(short_softmax.softmax_backward(g, out.detach()), x.grad)


def test_short_rows_are_the_ones_below_a_vector_register():
    wide = short_softmax._vector_bytes()
    assert wide in (32, 64)
    assert short_softmax.short_rows(torch.zeros(4, wide // 4 - 1))
    assert not short_softmax.short_rows(torch.zeros(4, wide // 4))
    assert short_softmax.short_rows(torch.zeros(4, wide // 8 - 1, dtype=torch.float64))
    assert not short_softmax.short_rows(torch.zeros(4, 3, dtype=torch.float16))
    assert not short_softmax.short_rows(torch.zeros(3))
    x = torch.randn(4, 3)
    assert torch.equal(short_softmax.log_softmax(x, 0), torch.log_softmax(x, 0))  # another dimension
    assert torch.equal(short_softmax.softmax(x, 0), torch.softmax(x, 0))


@pytest.mark.parametrize("classes", [2, 10, 16, 100])
def test_a_stack_s_cross_entropy_is_each_model_s(classes):
    """Each slot's loss and gradient equal torch's on that slot's ``[B, C]`` alone: to the bit for rows of a
    vector register or longer (torch's own layout), to a rounding for shorter ones."""
    torch.manual_seed(0)
    out = torch.randn(4, 32, classes, requires_grad=True)
    y = torch.randint(0, classes, (32,))
    losses = per_slot_loss(F.cross_entropy, out, y, False)
    losses.sum().backward()
    exact = not short_softmax.short_rows(out)
    for s in range(4):
        alone = out.detach()[s].clone().requires_grad_()
        loss = F.cross_entropy(alone, y)
        loss.backward()
        torch.testing.assert_close(losses[s], loss, rtol=1e-6, atol=0)  # torch's mean adds in another order
        torch.testing.assert_close(out.grad[s], alone.grad, **_tolerance(torch.float32))
        if exact:
            assert torch.equal(out.grad[s], alone.grad)


class _Attention(torch.nn.Module):
    """Hand-written attention over 6 tokens, its softmax in the four forms a model writes it."""

    def __init__(self, form: str):
        super().__init__()
        self.qk, self.out, self.form = torch.nn.Linear(3, 8), torch.nn.Linear(8, 2), form
        self.norm = torch.nn.Softmax(-1) if form == "module" else None

    def forward(self, x):
        h = self.qk(x)
        s = h @ h.transpose(1, 2)
        p = {"function": lambda: F.softmax(s, dim=-1), "torch": lambda: torch.softmax(s, -1),
             "method": lambda: s.softmax(-1), "module": lambda: self.norm(s)}[self.form]()
        return self.out((p @ h).mean(1)).log_softmax(-1)


@pytest.mark.parametrize("form", ["function", "torch", "method", "module"])
def test_the_direct_path_takes_every_form_of_a_short_softmax_through_here(form, monkeypatch):
    """F.softmax, torch.softmax, Tensor.softmax and nn.Softmax of short rows (and a log_softmax method) in a
    model on the direct path all run here, and the stack computes what each model computes alone."""
    import ray_modelbatch as rmb

    calls = []

    def spy(name):
        real = getattr(short_softmax, name)
        return lambda x, dim=-1: calls.append(name) or real(x, dim)

    for name in ("softmax", "log_softmax"):
        monkeypatch.setattr(short_softmax, name, spy(name))
    torch.manual_seed(0)
    models = [_Attention(form) for _ in range(3)]
    mb = rmb.ModelBatch(models)
    assert mb.uses_direct_path
    x = torch.randn(4, 6, 3)
    out = mb(x)
    assert calls.count("softmax") >= 1 and calls.count("log_softmax") >= 1
    for s, m in enumerate(models):
        torch.testing.assert_close(out[s], m(x), rtol=1e-5, atol=1e-6)
