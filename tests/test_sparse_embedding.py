"""``sparse=True`` embeddings: a stack trains them with dense gradients, exactly like ``torch.optim.SGD`` alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import FusedEngine, ModelBatch, optim

S, STEPS = 3, 5


class BagOfWords(nn.Module):
    def __init__(self, bag: bool):
        super().__init__()
        self.bag = bag
        self.emb = nn.EmbeddingBag(40, 8, mode="mean", sparse=True) if bag else nn.Embedding(40, 8, sparse=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.emb(x) if self.bag else self.emb(x).mean(1))


@pytest.mark.parametrize("bag", [False, True], ids=["Embedding", "EmbeddingBag"])
def test_a_sparse_embedding_trains_like_sparse_sgd_alone_and_says_so_once(bag):
    torch.manual_seed(0)
    models = [BagOfWords(bag) for _ in range(S)]
    solo = [copy.deepcopy(m) for m in models]
    with pytest.warns(UserWarning, match="sparse=True embeddings train with dense gradients"):
        mb = ModelBatch(models)
    assert all(m.emb.sparse for m in models)  # the user's modules are left as they are
    lrs = [0.5, 0.2, 0.1]
    engine = FusedEngine(mb, optim.SGD(mb, lr=lrs), F.cross_entropy)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, 40, (S, 4, 6), generator=g) for _ in range(STEPS)]
    ys = [torch.randint(0, 3, (S, 4), generator=g) for _ in range(STEPS)]
    for x, y in zip(xs, ys):
        engine.train_step(x, y, per_slot=True)
    for i in range(S):
        opt = torch.optim.SGD(solo[i].parameters(), lr=lrs[i])  # takes the sparse gradient as it is
        for x, y in zip(xs, ys):
            opt.zero_grad()
            F.cross_entropy(solo[i](x[i]), y[i]).backward()
            assert solo[i].emb.weight.grad.is_sparse
            opt.step()
        for name, p in solo[i].named_parameters():
            torch.testing.assert_close(mb.slot_state(i)[name], p.detach(), rtol=1e-5, atol=1e-6)
