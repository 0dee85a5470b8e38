import copy

import pytest
import torch
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
