"""torch.optim habits a fused optimizer keeps: torch's default keywords, step(closure), state_dict (issue 13, item 5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import ModelBatch, optim
from ray_modelbatch.errors import HyperparameterError


def _stack(n: int = 3) -> tuple[ModelBatch, list[nn.Module]]:
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)) for _ in range(n)]
    return ModelBatch([copy.deepcopy(m) for m in models]), models


@pytest.mark.parametrize("cls", [optim.SGD, optim.Adam, optim.AdamW, optim.RMSprop, optim.Adagrad, optim.Adamax,
                                 optim.NAdam, optim.RAdam])
def test_torch_default_keywords_are_accepted_and_others_named(cls):
    mb, _ = _stack()
    cls(mb, lr=1e-3, foreach=None, maximize=False, capturable=False, differentiable=False, fused=None)
    with pytest.raises(HyperparameterError, match=r"\(maximize=True\) is not supported") as info:
        cls(mb, lr=1e-3, maximize=True)
    assert "\n" not in str(info.value)


def test_step_with_a_closure_matches_torch():
    mb, models = _stack()
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    opt = optim.Adam(mb, lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(mb(x), y.expand(mb.num_slots, *y.shape))
        loss.backward()
        return loss

    refs = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in models]
    for _ in range(5):
        got = opt.step(closure)
        assert isinstance(got, torch.Tensor)
        for m, r in zip(models, refs):
            def solo_closure(m=m, r=r):
                r.zero_grad()
                # the fused loss averages over slots too: scale to the same per-model gradient
                loss = F.mse_loss(m(x), y) / mb.num_slots
                loss.backward()
                return loss
            r.step(solo_closure)
    for i, m in enumerate(models):
        for a, b in zip(mb.slot_module(i, copy.deepcopy(m)).parameters(), m.parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_continues_identically():
    mb, _ = _stack()
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    opt = optim.NAdam(mb, lr=[1e-2, 2e-2, 3e-3], schedule=optim.schedules.exponential(0.9))

    def step(o, m):
        o.zero_grad()
        F.cross_entropy(m(x).flatten(0, 1), y.repeat(m.num_slots)).backward()
        o.step()

    for _ in range(3):
        step(opt, mb)
    saved, weights = opt.state_dict(), mb.groups[torch.float32].data.clone()
    mb2, _ = _stack()
    mb2.groups[torch.float32].data.copy_(weights)
    opt2 = optim.NAdam(mb2, lr=1e-3)
    opt2.load_state_dict(saved)
    for _ in range(3):
        step(opt, mb)
        step(opt2, mb2)
    assert torch.equal(mb.groups[torch.float32].data, mb2.groups[torch.float32].data)
    with pytest.raises(HyperparameterError, match="NAdam over 3 slots"):
        optim.Adam(mb2).load_state_dict(saved)
