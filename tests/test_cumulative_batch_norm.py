"""BatchNorm with momentum=None trains fused as each model alone, each slot with its own batch count
(``ray_modelbatch/cumulative_batch_norm.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb

LRS = [0.1, 0.05, 0.02]


def _make(kind, seed):
    torch.manual_seed(seed)
    if kind == "1d":
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Linear(8, 3))
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 5 * 5, 3))


def _train_alone(model, lr, batches):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_a_cumulative_batch_norm_trains_like_the_model_alone_with_each_slots_own_count(kind):
    g = torch.Generator().manual_seed(0)
    shape = (16, 6) if kind == "1d" else (16, 2, 5, 5)
    batches = [(torch.randn(*shape, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(4)]
    mb = rmb.ModelBatch([_make(kind, i) for i in range(3)])
    engine = rmb.FusedEngine(mb, rmb.optim.SGD(mb, lr=LRS), F.cross_entropy)
    for x, y in batches[:2]:
        engine.train_step(x, y)
    mb.load_slot(2, _make(kind, 7))  # a new trial in slot 2: its count starts again at 0
    for x, y in batches[2:]:
        engine.train_step(x, y, slots=[0, 2] if x is batches[3][0] else None)
    expected = {0: _train_alone(_make(kind, 0), LRS[0], batches),
                1: _train_alone(_make(kind, 1), LRS[1], batches[:3]),
                2: _train_alone(_make(kind, 7), LRS[2], batches[2:])}
    for i, alone in expected.items():
        state = mb.slot_state(i)
        for k, v in alone.state_dict().items():
            torch.testing.assert_close(state[k], v, msg=k)
    assert [int(mb.slot_state(i)["1.num_batches_tracked"]) for i in range(3)] == [4, 3, 2]
    mb.eval()
    x = batches[0][0]
    for i, alone in expected.items():
        torch.testing.assert_close(mb(x)[i], alone.eval()(x))
