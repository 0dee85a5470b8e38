"""stacked_embedding and stacked_lookup: on the vmap path every slot reads its own table in place, and its
padding_idx row stays out of the gradient, as alone.

torch's vmap rule for ``nn.Embedding`` copies every slot's table at each
lookup and leaves only slot 0's padding row out; the stack's
``StackedEmbedding`` looks up with :func:`ray_modelbatch.stacked_lookup.lookup`,
whose vmap rule gathers from the stacked tables. These cases force vmap
(``direct_path=False``) unless they say otherwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import train_fused_and_alone
from ray_modelbatch import ModelBatch
from ray_modelbatch.stacked_embedding import StackedEmbedding, stack_embeddings
from ray_modelbatch.stacked_lookup import lookup, stacked_lookup


class MeanOfTokens(nn.Module):
    def __init__(self, vocab: int = 12, padding_idx: int | None = 0):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, 4, padding_idx=padding_idx), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


def test_every_slot_trains_as_alone_and_keeps_its_padding_row_on_vmap():
    torch.manual_seed(0)
    s = 3
    models = [MeanOfTokens() for _ in range(s)]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 4, (s, 6, 5), generator=g), torch.randint(0, 3, (s, 6), generator=g)
    mb, solo = train_fused_and_alone(models, x, y, steps=3, direct_path=False)
    assert not mb.uses_direct_path and isinstance(mb._template.emb, StackedEmbedding)
    for i in range(s):
        got = mb.slot_state(i)["emb.weight"]
        torch.testing.assert_close(got, solo[i].emb.weight, atol=1e-6, rtol=0)
        assert torch.equal(got[0], models[i].emb.weight[0])  # the padding row did not move


def test_the_lookup_has_the_embeddings_values_and_no_gradient_at_the_padding_row():
    torch.manual_seed(1)
    plain = nn.Embedding(7, 3, padding_idx=2)
    padded = copy.deepcopy(plain)
    padded.__class__ = StackedEmbedding
    x = torch.tensor([[2, 0, 5, 2], [1, 2, 6, 3]])
    out_plain, out_padded = plain(x), padded(x)
    assert torch.equal(out_plain, out_padded)
    gy = torch.randn_like(out_plain)
    out_plain.backward(gy)
    out_padded.backward(gy)
    assert torch.equal(padded.weight.grad, plain.weight.grad)  # the same gradient, the padding row's 0 included
    assert padded.weight.grad[2].eq(0).all()


class Tokens(nn.Module):
    """A language model's front: a large table, few tokens per step, a padding row."""

    def __init__(self, vocab: int = 500, padding_idx: int | None = 1):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, 8, padding_idx=padding_idx), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)).sum(1))


class _Outputs(TorchDispatchMode):
    """Records the number of elements of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and not func.is_view:  # views of the tables copy nothing
                self.sizes.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("direct_path", [False, True])
def test_a_fused_lookup_never_copies_the_tables(direct_path):
    torch.manual_seed(0)
    s = 4
    mb = ModelBatch([Tokens() for _ in range(s)], direct_path=direct_path)
    assert mb.uses_direct_path == direct_path
    x = torch.randint(0, 500, (6, 5))
    mb(x)  # plans and vmapped functions built outside the recording
    mode = _Outputs()
    with mode:
        mb(x)
    tables = s * 500 * 8
    assert not [(op, n) for op, n in mode.sizes if n >= tables], "the forward copied the embedding tables"


@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("pad", [-1, 1])
def test_vmapped_lookups_give_each_tables_own_gradient_to_the_bit(per_slot, pad):
    """vmap over stacked tables (strided, as a stack's parameters are) against F.embedding of each table alone,
    with many repeated tokens (the order of the sums matters) and padding tokens."""
    torch.manual_seed(2)
    s, v, d = 3, 60, 8
    flat = torch.randn(s, v * d + 7)  # a slot's row of the flat buffer holds other parameters too
    tables = flat[:, 5:5 + v * d].view(s, v, d).requires_grad_()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 6, (s, 7, 9) if per_slot else (7, 9), generator=g)
    x[..., 0] = 1
    out = torch.vmap(lambda t, i: lookup(t, i, pad), in_dims=(0, 0 if per_slot else None))(tables, x)
    go = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, tables, go)
    for i in range(s):
        alone = tables[i].detach().clone().requires_grad_()
        ref = F.embedding(x[i] if per_slot else x, alone, None if pad < 0 else pad)
        assert torch.equal(out[i], ref)
        (want,) = torch.autograd.grad(ref, alone, go[i])
        assert torch.equal(got[i], want), i
        if pad >= 0:
            assert got[i][pad].eq(0).all()


def test_the_lookup_operators_have_first_and_second_derivatives():
    torch.manual_seed(3)
    table = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 4, 4], [8, 0, 2]])
    assert torch.autograd.gradcheck(lambda t: lookup(t, idx, -1), (table,))
    assert torch.autograd.gradgradcheck(lambda t: lookup(t, idx, -1).square(), (table,))
    tables = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    both = torch.stack([idx, idx.flip(1)])
    assert torch.autograd.gradcheck(lambda t: stacked_lookup(t, both, True, -1), (tables,))
    assert torch.autograd.gradgradcheck(lambda t: stacked_lookup(t, idx, False, -1).square(), (tables,))
    assert torch.equal(stacked_lookup(tables, both, True, -1)[1], F.embedding(both[1], tables[1]))
    # a padding row gets no gradient, first or second (as F.embedding's padding_idx; gradcheck's finite
    # differences would see the row's value in the output, so it is checked directly)
    (g1,) = torch.autograd.grad(lookup(table, idx, 4).square().sum(), table, create_graph=True)
    (g2,) = torch.autograd.grad(g1.sum(), table)
    assert g1[4].eq(0).all() and g2[4].eq(0).all() and g1[0].ne(0).all()


def test_the_direct_paths_lookup_is_the_operator_without_its_dispatch():
    """gather_rows (the direct path's lookup, a plain autograd Function) computes what the registered operator
    computes, padding rows included, bit for bit (and has second derivatives); and a direct-path step of a
    model with an embedding imports no torch._dynamo (the operator's first call does: 0.8 CPU-s per host)."""
    import subprocess
    import sys
    import textwrap

    from ray_modelbatch.stacked_lookup import gather_rows

    torch.manual_seed(5)
    tables = torch.randn(3, 9, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 9, (3, 2, 5))
    for args in ((idx, True, -1), (idx[0], False, 2), (idx, True, 4)):
        a, b = gather_rows(tables, *args), stacked_lookup(tables, *args)
        go = torch.randn_like(a)
        (ga,) = torch.autograd.grad(a, tables, go)
        (gb,) = torch.autograd.grad(b, tables, go)
        assert torch.equal(a, b) and torch.equal(ga, gb)
    assert torch.autograd.gradcheck(lambda t: gather_rows(t, idx, True, -1), (tables,))
    assert torch.autograd.gradgradcheck(lambda t: gather_rows(t, idx[0], False, -1).square(), (tables,))
    code = textwrap.dedent("""
        import sys, torch, torch.nn.functional as F
        from torch import nn
        import ray_modelbatch as rmb
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb, self.fc = nn.Embedding(17, 8), nn.Linear(8, 3)
            def forward(self, x):
                return self.fc(self.emb(x).mean(1))
        mb = rmb.ModelBatch([M() for _ in range(3)])
        engine = rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=1e-2), F.cross_entropy)
        engine.train_step(torch.randint(0, 17, (4, 6)), torch.randint(0, 3, (4,)))
        print(mb.why_vmap(), "torch._dynamo" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["None", "False"], out


def test_embeddings_with_max_norm_or_counts_keep_torchs_own_forward():
    model = nn.Sequential(nn.Embedding(5, 2, max_norm=1.0), nn.Embedding(5, 2, scale_grad_by_freq=True),
                          nn.Embedding(5, 2))
    stack_embeddings(model)
    assert [type(m) for m in model] == [nn.Embedding, nn.Embedding, StackedEmbedding]


def test_both_ways_of_adding_the_rows_give_the_same_gradient():
    """On a CPU the rows are added with index_add; elsewhere with torch's embedding backward (run here on the
    CPU for the check): the same bits, padding rows left out in both."""
    from ray_modelbatch.stacked_lookup import _rows_grad

    torch.manual_seed(4)
    rows = torch.randint(0, 30, (200,), dtype=torch.int32)
    go = torch.randn(200, 5, dtype=torch.float64)
    for pad in (-1, 3):
        a = _rows_grad(rows, go, 30, 10, pad, index_add=True)
        b = _rows_grad(rows, go, 30, 10, pad, index_add=False)
        assert torch.equal(a, b)
        if pad >= 0:
            assert a[[3, 13, 23]].eq(0).all()


def test_a_non_finite_gradient_at_a_padding_position_reaches_no_row():
    """The padding rows' sums are dropped after the rows are added: what arrived there, even a NaN, goes too."""
    tables = torch.randn(2, 6, 3, requires_grad=True)
    idx = torch.tensor([[1, 2, 1], [2, 4, 5]])
    out = stacked_lookup(tables, idx, True, 2)
    go = torch.ones_like(out)
    go[0, 1] = float("nan")  # slot 0 looked up its padding row 2 there
    go[1, 0] = float("inf")  # and slot 1 at its first token
    (grad,) = torch.autograd.grad(out, tables, go)
    assert grad[:, 2].eq(0).all() and grad.isfinite().all()
    assert torch.equal(grad[0, 1], torch.full((3,), 2.0)) and torch.equal(grad[1, 4], torch.ones(3))
