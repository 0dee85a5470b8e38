"""The second moments' root without torch's slow zeros keeps torch.optim's bits (optim/moment_sqrt.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import ModelBatch, optim
from ray_modelbatch.optim import moment_sqrt

TINY = torch.finfo(torch.float32).tiny


def _moments(n: int = 20000) -> torch.Tensor:
    """Second moments as an update meets them: normal values, exact zeros and subnormals. (Importing
    ray_modelbatch made torch's first vector-math call on one thread, so the first parallel ``sqrt`` here is
    exact: see ``ray_modelbatch/vector_math_init.py``.)"""
    g = torch.Generator().manual_seed(0)
    v = torch.rand(n, generator=g) * 10.0 ** torch.randint(-30, 2, (n,), generator=g).float()
    v[:2000] = 0.0
    v[2000:2500] = TINY * torch.rand(500, generator=g)  # subnormal
    v[2500:2600] = TINY
    return v


@pytest.mark.parametrize("beta2", [0.0, 0.9, 0.999, 0.99999])
@pytest.mark.parametrize("eps", [1e-8, 1e-10, 5e-12])
def test_clamped_root_gives_the_same_denominator_wherever_the_check_allows_it(eps, beta2):
    v = _moments()
    d = torch.tensor((1.0 - beta2) ** 0.5)
    floor = torch.tensor([eps * (1.0 - beta2) ** 0.5])
    plain = v.sqrt().div_(d).add_(eps)
    clamped = moment_sqrt.sqrt(v, True).div_(d).add_(eps)
    if moment_sqrt.clamp_is_exact(floor, torch.float32):
        assert torch.equal(plain, clamped)


@pytest.mark.parametrize("eps", [0.0, 1e-16])
def test_where_eps_is_too_small_the_clamp_would_change_the_bits(eps):
    v = _moments()
    d = torch.tensor(0.001 ** 0.5)
    assert not moment_sqrt.clamp_is_exact(torch.tensor([eps * 0.001 ** 0.5]), torch.float32)
    assert not torch.equal(v.sqrt().div_(d).add_(eps), moment_sqrt.sqrt(v, True).div_(d).add_(eps))


def test_the_check_refuses_what_the_clamp_would_change():
    assert moment_sqrt.clamp_is_exact(torch.tensor([1e-8, 1e-6]), torch.float32)
    assert not moment_sqrt.clamp_is_exact(torch.tensor([1e-8, 0.0]), torch.float32)  # eps = 0: one slot is enough
    assert not moment_sqrt.clamp_is_exact(torch.tensor([1e-13]), torch.float32)
    assert not moment_sqrt.clamp_is_exact(torch.tensor([1e-8]), torch.float16)  # sqrt(tiny) is 8e-3 there
    assert moment_sqrt.clamp_is_exact(torch.tensor([1e-100], dtype=torch.float64), torch.float64)
    assert not moment_sqrt.clamp_is_exact(None, torch.float32)
    assert not moment_sqrt.clamp_is_exact(torch.tensor([float("nan")]), torch.float32)
    v = torch.tensor([0.0, 4.0])
    assert torch.equal(moment_sqrt.sqrt_(v.clone(), True), torch.tensor([TINY ** 0.5, 2.0]))
    assert torch.equal(moment_sqrt.sqrt(v, False), torch.tensor([0.0, 2.0]))


OPTIMIZERS = [
    (optim.Adam, {"lr": 1e-2}),
    (optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    (optim.AdamW, {"lr": 1e-2, "betas": (0.9, 0.99999)}),
    (optim.NAdam, {"lr": 1e-2}),
    (optim.RAdam, {"lr": 1e-2}),
    (optim.Adagrad, {"lr": 1e-1}),
    (optim.RMSprop, {"lr": 1e-3}),
    (optim.RMSprop, {"lr": 1e-3, "momentum": 0.9}),
]


def _train(cls, kw, clamp: bool | None, steps: int = 12,
           zeros: bool = True) -> tuple[ModelBatch, optim.VectorOptimizer]:
    """Slots whose first input is always 0 (that weight column's moments stay exactly 0) and whose second is
    about 1e-21: its gradients' squares underflow to 0 while the gradients do not, so the root decides the
    update there."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2)) for _ in range(3)]
    for m in models:  # the tiny input's weights start at 0, so their tiny updates show in the parameters
        nn.init.zeros_(m[0].weight[:, 1])
    mb = ModelBatch([copy.deepcopy(m) for m in models])
    opt = cls(mb, **kw)
    if clamp is False:  # torch's plain sqrt throughout
        opt._sqrt_allowed = []
        opt._sqrt_clamp = {dt: False for dt in opt._sqrt_clamp}
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=g)
        if zeros:
            x[:, 0] = 0.0
            x[:, 1] *= 1e-21
        y = torch.randn(32, 2, generator=g)
        opt.zero_grad()
        F.mse_loss(mb(x), y.expand(mb.num_slots, *y.shape)).backward()
        opt.step()
    return mb, opt


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_updates_with_zero_moments_are_bit_for_bit_torch_sqrts(cls, kw):
    mb, opt = _train(cls, kw, None)
    assert opt._sqrt_clamp[torch.float32] is True  # the default eps of each allows the clamp
    state = next(iter(opt.state.values()))
    moments = state.get("exp_avg_sq", state.get("sum", state.get("square_avg")))
    grad = mb.groups[torch.float32].grad
    assert (moments == 0).any()
    assert ((moments < TINY) & (grad != 0)).any()  # where the root decides the update
    plain, plain_opt = _train(cls, kw, False)
    assert plain_opt._sqrt_clamp[torch.float32] is False
    assert torch.equal(mb.groups[torch.float32].data, plain.groups[torch.float32].data)


def test_updates_whose_eps_cannot_absorb_the_clamp_take_torchs_sqrt():
    _, opt = _train(optim.Adam, {"lr": 1e-2, "eps": 0.0}, None, steps=1)
    assert opt._sqrt_clamp[torch.float32] is False
    _, opt = _train(optim.RMSprop, {"lr": 1e-3, "centered": True}, None, steps=1)
    assert opt._sqrt_clamp[torch.float32] is False
    _, opt = _train(optim.Adam, {"lr": 1e-2}, None, steps=1)
    opt.set_hparams([1], eps=1e-14)  # one slot's new eps turns the clamp off for the stack
    assert opt._sqrt_clamp[torch.float32] is False
    opt.set_hparams([1], eps=1e-8)
    assert opt._sqrt_clamp[torch.float32] is True


def test_the_clamp_runs_only_while_the_moments_hold_zeros():
    """Without zeros the clamp is a pass for nothing: after the periodic look it is off, and a slot's reset
    (fresh moments are zeros) turns it back on."""
    from ray_modelbatch.optim.base import ROOT_CHECK_EVERY

    mb, opt = _train(optim.Adam, {"lr": 1e-2}, None, steps=ROOT_CHECK_EVERY + 1, zeros=False)
    assert opt._sqrt_allowed == [torch.float32] and opt._sqrt_clamp[torch.float32] is False
    torch.manual_seed(5)
    mb.reset_slot(1, nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2)))  # a new trial in slot 1
    assert opt._sqrt_clamp[torch.float32] is True
    mb, opt = _train(optim.Adam, {"lr": 1e-2}, None, steps=ROOT_CHECK_EVERY + 1, zeros=True)
    assert opt._sqrt_clamp[torch.float32] is True
