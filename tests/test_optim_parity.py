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


class _PartlyUsed(nn.Module):
    """A training forward that reaches only some parameters: an unused layer, a head used only in evaluation, a
    weight read through ``.detach()``. torch.optim skips those (their ``.grad`` is None): no decay, no moments."""

    def __init__(self):
        super().__init__()
        self.body, self.unused, self.eval_head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.head = nn.Linear(8, 2)
        self.gate = nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = torch.tanh(self.body(x)) * self.gate.detach()
        return self.head(h) if self.training else self.eval_head(h)


@pytest.mark.parametrize("cls, kw", [
    (optim.SGD, dict(momentum=0.9, weight_decay=0.1)), (optim.Adam, dict(weight_decay=0.1)),
    (optim.AdamW, dict(weight_decay=0.1)), (optim.RMSprop, dict(weight_decay=0.1, momentum=0.5)),
    (optim.Adagrad, dict(weight_decay=0.1)), (optim.Adamax, dict(weight_decay=0.1)),
    (optim.NAdam, dict(weight_decay=0.1)), (optim.RAdam, dict(weight_decay=0.1))],
    ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_parameters_without_a_gradient_are_left_as_torch_leaves_them(cls, kw):
    torch.manual_seed(0)
    models = [_PartlyUsed() for _ in range(3)]
    mb = ModelBatch([copy.deepcopy(m) for m in models])
    lrs = [1e-2, 3e-2, 1e-1]
    opt = cls(mb, lr=lrs, **kw)
    refs = [getattr(torch.optim, cls.__name__)(m.parameters(), lr=lr, **kw) for m, lr in zip(models, lrs)]
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(3, 16, 4, generator=g), torch.randn(3, 16, 2, generator=g)
        opt.zero_grad()
        F.mse_loss(mb(x, per_slot=True), y, reduction="none").mean((1, 2)).sum().backward()  # each slot its own
        opt.step()
        for i, (m, ref) in enumerate(zip(models, refs)):
            ref.zero_grad()
            F.mse_loss(m(x[i]), y[i]).backward()
            ref.step()
    assert set(mb.gradless) == {"unused.weight", "unused.bias", "eval_head.weight", "eval_head.bias", "gate"}
    for i, m in enumerate(models):
        for name, p in m.named_parameters():
            torch.testing.assert_close(mb.params[name][i], p.detach(), msg=name)
