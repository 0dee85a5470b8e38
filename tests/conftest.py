import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    def __init__(self, d_in: int = 5, hidden: int = 8, d_out: int = 3, dropout: float = 0.0, bn: bool = False):
        layers: list[nn.Module] = [nn.Linear(d_in, hidden)]
        if bn:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, d_out))
        super().__init__(*layers)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_models(n: int, **kw) -> list[nn.Module]:
    return [MLP(**kw) for _ in range(n)]


def clones(models):
    return [copy.deepcopy(m) for m in models]


def max_rel_diff(mb, refs) -> float:
    """Largest relative difference between each slot's state and its reference model."""
    worst = 0.0
    for i, r in enumerate(refs):
        got = mb.slot_state(i)
        for k, v in r.state_dict().items():
            if not v.is_floating_point():
                continue
            scale = max(v.abs().max().item(), 1e-12)
            worst = max(worst, (got[k] - v).abs().max().item() / scale)
    return worst


def train_fused_and_alone(models, x, y, steps: int, lr: float = 1e-2, **mb_kw):
    """Copies of ``models`` trained ``steps`` times with Adam on per-slot batches ``x[i]``, ``y[i]`` and
    cross-entropy: fused (a ``ModelBatch`` built with ``mb_kw``) and each alone with ``torch.optim.Adam``.
    Returns ``(mb, solo)``; compare them with :func:`max_rel_diff` or slot by slot."""
    from ray_modelbatch import FusedEngine, ModelBatch, optim

    solo = clones(models)
    mb = ModelBatch(clones(models), **mb_kw)
    engine = FusedEngine(mb, optim.Adam(mb, lr=lr), F.cross_entropy)
    opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in solo]
    for _ in range(steps):
        engine.train_step(x, y, per_slot=True)
        for i, (m, opt) in enumerate(zip(solo, opts)):
            opt.zero_grad()
            F.cross_entropy(m(x[i]), y[i]).backward()
            opt.step()
    return mb, solo
