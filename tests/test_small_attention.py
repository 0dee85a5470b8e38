"""small_attention: short-sequence attention as bmm-softmax-bmm gives SDPA's outputs and gradients.

The direct path sends folded attention calls of up to ``MAX_LEN`` tokens here
instead of torch's CPU flash kernel (see the module docstring for the
measurements); a model's training must not change beyond fp32 rounding. Each
case compares the output and the gradients of q, k and v with
``F.scaled_dot_product_attention`` on the same inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ray_modelbatch import small_attention


def _both(q, k, v, mask=None, is_causal=False, scale=None):
    """(output, grads) of small_attention and of SDPA on copies of the same leaves."""
    results = []
    g = torch.randn(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for fn in (small_attention.attention, F.scaled_dot_product_attention):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if fn is small_attention.attention:
            assert small_attention.applies(*leaves, mask, 0.0)
            out = fn(*leaves, mask, is_causal, scale)
        else:
            out = fn(*leaves, mask, 0.0, is_causal, scale=scale)
        out.backward(g)
        results.append((out.detach(), [t.grad for t in leaves]))
    return results


def _close(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=1e-6)
    for name, ga, gb in zip("qkv", grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6, msg=f"grad of {name}")


@pytest.mark.parametrize("tq,tk", [(16, 16), (5, 9), (32, 32)])
def test_matches_sdpa_without_a_mask(tq, tk):
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 4, tq, 8), torch.randn(6, 4, tk, 8), torch.randn(6, 4, tk, 12)
    _close(*_both(q, k, v))
    _close(*_both(q, k, v, scale=0.3))


def test_matches_sdpa_on_strided_views_of_a_packed_projection():
    """The direct path's inputs: q, k, v unbound from one [B, T, 3, heads, hd] projection, heads moved ahead."""
    torch.manual_seed(1)
    packed = torch.randn(5, 16, 3, 4, 8)
    q, k, v = (t.transpose(1, 2) for t in packed.unbind(2))
    _close(*_both(q, k, v))


def test_masks_causal_and_rows_with_nothing_to_attend():
    torch.manual_seed(2)
    q, k, v = torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    float_mask = torch.randn(3, 1, 7, 7)
    _close(*_both(q, k, v, float_mask))
    allowed = torch.rand(3, 2, 7, 7) > 0.3
    allowed[0, 1, 4] = False  # a query that may attend to nothing: SDPA gives zeros, and zero gradients
    allowed[2, :, :, 0] = True
    _close(*_both(q, k, v, allowed))
    padding = torch.zeros(3, 1, 1, 7)
    padding[1, ..., 5:] = float("-inf")
    padding[2] = float("-inf")  # a whole sequence of padding
    _close(*_both(q, k, v, padding))
    _close(*_both(q, k, v, is_causal=True))
    out, _ = _both(q, k, v, allowed)[0]
    assert out[0, 1, 4].eq(0).all() and out.isfinite().all()


def test_float64():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 10, 4, dtype=torch.float64) for _ in range(3))
    (out_a, grads_a), (out_b, grads_b) = _both(q, k, v, is_causal=True)
    torch.testing.assert_close(out_a, out_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb)


def test_calls_it_leaves_to_sdpa():
    q = torch.randn(2, 2, 16, 8)
    ok = small_attention.applies
    assert ok(q, q, q, None, 0.0)
    assert not ok(q, q, q, None, 0.1)  # dropout: SDPA draws the mask
    assert not ok(q, q, q, None, 0.0, enable_gqa=True)
    long = torch.randn(2, 2, small_attention.MAX_LEN + 1, 8)
    assert not ok(long, long, long, None, 0.0)
    assert not ok(q.half(), q.half(), q.half(), None, 0.0)
    assert not ok(q, q, q, torch.zeros(16, 16, requires_grad=True), 0.0)  # a mask that needs its gradient
    assert not ok(q, q, q, torch.zeros(1, 1, 1, 16, 16), 0.0)  # a mask with more dims than q
    assert not ok(q, torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8), None, 0.0)  # broadcast batch dims
    assert not ok(q[0, 0], q[0, 0], q[0, 0], None, 0.0)  # no batch dimension
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ok(q, q, q, None, 0.0)


def _packed_and_unbound(qkv, heads, mask=None, is_causal=False):
    """(output, gradient of the projection) of packed_self_attention and of attention on the q, k and v
    that nn.MultiheadAttention unbinds from the same [G, T, 3E] projection."""
    g_, t, e3 = qkv.shape
    hd = e3 // 3 // heads
    gy = torch.randn(g_, heads, t, hd, dtype=qkv.dtype)
    results = []
    for packed in (True, False):
        leaf = qkv.detach().clone().requires_grad_()
        if packed:
            out = small_attention.packed_self_attention(leaf, heads, mask, is_causal)
        else:
            q, k, v = (x.reshape(g_, t, heads, hd).transpose(1, 2) for x in leaf.unflatten(-1, (3, -1)).unbind(-2))
            out = small_attention.attention(q, k, v, mask, is_causal)
        out.backward(gy)
        results.append((out.detach(), leaf.grad))
    return results


@pytest.mark.parametrize("case", ["none", "causal", "bool", "float", "padding"])
def test_packed_self_attention_gives_the_unbound_bits(case):
    """The direct path's self-attention: one packed block gives every output and gradient bit that the
    three unbound heads give (same GEMMs, same softmax kernels), masks and empty rows included."""
    torch.manual_seed(5)
    g_, t, heads, hd = 6, 7, 2, 4
    qkv = torch.randn(g_, t, 3 * heads * hd)
    mask, causal = None, case == "causal"
    if case == "bool":
        mask = torch.rand(g_, heads, t, t) > 0.3
        mask[0, 1, 4] = False  # a query that may attend to nothing
    elif case == "float":
        mask = torch.randn(1, t, t)
    elif case == "padding":
        mask = torch.zeros(g_, 1, 1, t)
        mask[1, ..., 5:] = float("-inf")
        mask[2] = float("-inf")
    (out_p, grad_p), (out_u, grad_u) = _packed_and_unbound(qkv, heads, mask, causal)
    assert torch.equal(out_p, out_u)
    assert torch.equal(grad_p, grad_u)
    assert grad_p.isfinite().all()


def test_packed_self_attention_differentiates_twice():
    """A gradient penalty through the packed block: its backward recomputes in differentiable ops."""
    torch.manual_seed(6)
    qkv0 = torch.randn(3, 5, 3 * 2 * 4, dtype=torch.float64)
    results = []
    for packed in (True, False):
        qkv = qkv0.clone().requires_grad_()
        if packed:
            out = small_attention.packed_self_attention(qkv, 2, is_causal=True)
        else:
            q, k, v = (x.reshape(3, 5, 2, 4).transpose(1, 2) for x in qkv.unflatten(-1, (3, -1)).unbind(-2))
            out = small_attention.attention(q, k, v, is_causal=True)
        (g,) = torch.autograd.grad(out.square().sum(), qkv, create_graph=True)
        g.square().sum().backward()
        results.append(qkv.grad)
    torch.testing.assert_close(results[0], results[1])
    assert results[0].abs().sum() > 0


def test_differentiates_twice():
    """A gradient penalty through attention (torch's CPU flash kernel cannot): against the same math in
    plain ops, second derivatives included."""
    torch.manual_seed(4)
    q0, k0, v0 = (torch.randn(2, 2, 6, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6) > 0.2
    mask[..., 0] = True

    def reference(q, k, v):
        s = (q @ k.transpose(-2, -1) / 2.0).masked_fill(~mask, float("-inf"))
        return torch.softmax(s, -1) @ v

    results = []
    for fn in (lambda q, k, v: small_attention.attention(q, k, v, mask), reference):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        (gq,) = torch.autograd.grad(fn(q, k, v).square().sum(), q, create_graph=True)
        gq.square().sum().backward()
        results.append([t.grad for t in (q, k, v)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_the_direct_path_routes_short_attention_here_and_dropout_to_sdpa(monkeypatch):
    """A fused TransformerEncoder on CPU at 6 tokens calls this module once per layer (its packed form: the
    layer's self-attention asks for no weights); with attention dropout in training it keeps SDPA (each slot's mask from its own generator, which SDPA draws itself)."""
    import ray_modelbatch as rmb
    from torch import nn

    calls = []
    for fn in ("attention", "packed_self_attention"):  # the packed form: self-attention without weights
        real = getattr(small_attention, fn)
        monkeypatch.setattr(small_attention, fn, lambda *a, real=real, fn=fn, **k: calls.append(fn) or real(*a, **k))

    class Encoder(nn.Module):
        def __init__(self, dropout):
            super().__init__()
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=dropout, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.encoder(x).mean(1))

    x = torch.randn(4, 6, 8)
    for dropout, expected in ((0.0, 2), (0.1, 0)):
        torch.manual_seed(0)
        mb = rmb.ModelBatch([Encoder(dropout) for _ in range(3)])
        calls.clear()
        mb(x).sum().backward()
        assert mb.uses_direct_path and not mb._slow_keys
        assert calls == ["packed_self_attention"] * expected, (dropout, calls)
