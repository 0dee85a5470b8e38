"""padded_embedding: on the vmap path every slot's padding_idx row stays out of the gradient, as alone.

torch's vmap rule for ``nn.Embedding(padding_idx)`` leaves only slot 0's
padding row out; the stack's ``PaddedEmbedding`` takes the padding tokens'
vectors from the detached table instead. These cases force vmap
(``direct_path=False``); the direct path has its own embedding kernel.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import FusedEngine, ModelBatch, optim
from ray_modelbatch.padded_embedding import PaddedEmbedding


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
    solo = [copy.deepcopy(m) for m in models]
    mb = ModelBatch([copy.deepcopy(m) for m in models], direct_path=False)
    assert not mb.uses_direct_path and isinstance(mb._template.emb, PaddedEmbedding)
    engine = FusedEngine(mb, optim.Adam(mb, lr=1e-2), F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 4, (s, 6, 5), generator=g), torch.randint(0, 3, (s, 6), generator=g)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in solo]
    for _ in range(3):
        engine.train_step(x, y, per_slot=True)
        for i in range(s):
            opts[i].zero_grad()
            F.cross_entropy(solo[i](x[i]), y[i]).backward()
            opts[i].step()
    for i in range(s):
        got = mb.slot_state(i)["emb.weight"]
        torch.testing.assert_close(got, solo[i].emb.weight, atol=1e-6, rtol=0)
        assert torch.equal(got[0], models[i].emb.weight[0])  # the padding row did not move


def test_the_lookup_has_the_embeddings_values_and_no_gradient_at_the_padding_row():
    torch.manual_seed(1)
    plain = nn.Embedding(7, 3, padding_idx=2)
    padded = copy.deepcopy(plain)
    padded.__class__ = PaddedEmbedding
    x = torch.tensor([[2, 0, 5, 2], [1, 2, 6, 3]])
    out_plain, out_padded = plain(x), padded(x)
    assert torch.equal(out_plain, out_padded)
    gy = torch.randn_like(out_plain)
    out_plain.backward(gy)
    out_padded.backward(gy)
    assert torch.equal(padded.weight.grad, plain.weight.grad)  # the same gradient, the padding row's 0 included
    assert padded.weight.grad[2].eq(0).all()
