"""RMSprop, Adagrad, Adamax, NAdam and RAdam: each slot trains exactly like its model alone with torch.optim.

Every test stacks 4 small models (Linear+Tanh+Linear, with biases) whose
hyperparameters all differ, so that every branch of an update (momentum,
centering, lr decay, initial accumulator, coupled and decoupled weight decay,
RAdam's rectification switch) runs next to the others in one fused step.
"""

import math

import pytest
import torch
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch.errors import HyperparameterError

from conftest import clones, make_models

S = 4
STEPS = 20
LR = [0.01, 0.005, 0.02, 0.003]
BETAS = [(0.9, 0.999), (0.8, 0.99), (0.95, 0.9), (0.5, 0.6)]

# Per-slot keywords of each optimizer: every slot differs, every branch is taken by some slot.
CONFIGS = {
    "RMSprop": dict(lr=LR, alpha=[0.99, 0.9, 0.95, 0.8], eps=[1e-8, 1e-6, 1e-8, 1e-7],
                    weight_decay=[0.0, 1e-2, 0.0, 1e-3],
                    momentum=[0.0, 0.9, 0.0, 0.5], centered=[False, False, True, True]),
    "Adagrad": dict(lr=[0.05, 0.02, 0.1, 0.03], lr_decay=[0.0, 0.01, 0.1, 0.0], weight_decay=[0.0, 0.01, 0.0, 0.1],
                    initial_accumulator_value=[0.0, 0.1, 1.0, 0.5], eps=[1e-10, 1e-8, 1e-10, 1e-6]),
    "Adamax": dict(lr=LR, betas=BETAS, eps=[1e-8, 1e-6, 1e-7, 1e-8], weight_decay=[0.0, 0.01, 0.0, 0.1]),
    "NAdam": dict(lr=LR, betas=BETAS, eps=[1e-8, 1e-6, 1e-7, 1e-8], weight_decay=[0.0, 0.01, 0.05, 0.1],
                  momentum_decay=[4e-3, 1e-2, 0.0, 4e-3], decoupled_weight_decay=[False, False, True, True]),
    # rectified from step 6 (beta2 0.999), 10 (0.7) and 12 (0.68) on; never with 0.6 (rho_inf = 4 < 5)
    "RAdam": dict(lr=LR, betas=[(0.9, 0.999), (0.8, 0.7), (0.95, 0.68), (0.5, 0.6)], eps=[1e-8, 1e-6, 1e-7, 1e-8],
                  weight_decay=[0.0, 0.01, 0.05, 0.1],
                  decoupled_weight_decay=[False, False, True, True]),
}
NAMES = list(CONFIGS)


def slot_kwargs(name, i):
    return {k: v[i] for k, v in CONFIGS[name].items()}


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)) for _ in range(n)]


def fused_step(mb, opt, x, y, **step_kw):
    mb.zero_grad()
    losses, _ = mb.forward_loss(x, y, nn.functional.mse_loss)
    losses.sum().backward()
    opt.step(**step_kw)


def snapshot(mb, opt, i):
    """Every per-slot tensor of slot i (weights, optimizer state, step count, per-slot scalars)."""
    tensors = {**mb.slot_tensors(), **opt.slot_tensors()}
    return {k: v[i].detach().clone() for k, v in tensors.items()}


def assert_bit_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", NAMES)
def test_each_slot_matches_torch_optim(name):
    models = make_models(S)
    refs = clones(models)
    mb = rmb.ModelBatch(models)
    opt = getattr(rmb.optim, name)(mb, **CONFIGS[name])
    ropts = [getattr(torch.optim, name)(r.parameters(), **slot_kwargs(name, i)) for i, r in enumerate(refs)]
    for x, y in batches(STEPS):
        fused_step(mb, opt, x, y)
        for r, o in zip(refs, ropts):
            o.zero_grad()
            nn.functional.mse_loss(r(x), y).backward()
            o.step()
    for i, r in enumerate(refs):
        got = mb.slot_state(i)
        for k, v in r.state_dict().items():
            torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5, msg=f"{name} slot {i} {k}")
    if name == "NAdam":  # the per-slot mu_product is torch's per-parameter one (torch keeps it in float32)
        want = [float(o.state[next(iter(r.parameters()))]["mu_product"]) for r, o in zip(refs, ropts)]
        assert opt.scalars["mu_product"].tolist() == pytest.approx(want, rel=1e-6)


def test_radam_slots_cross_the_rectification_threshold_at_their_own_step():
    """The RAdam comparison covers both branches: slots 0-2 switch to the rectified step within 20 steps,
    each at another step, slot 3 (beta2=0.6) never does."""
    def first_rectified(beta2):
        rho_inf = 2 / (1 - beta2) - 1
        for t in range(1, STEPS + 1):
            if rho_inf - 2 * t * beta2**t / (1 - beta2**t) > 5:
                return t
        return None

    firsts = [first_rectified(b2) for _, b2 in CONFIGS["RAdam"]["betas"]]
    assert all(t is not None and 1 < t <= STEPS for t in firsts[:3]) and firsts[3] is None
    assert firsts == [6, 10, 12, None]


# Adam and AdamW share the masking rules; checked here with the same eps=0 slot.
MASKED_ALSO = {name: dict(lr=LR, eps=[1e-8, 0.0, 1e-8, 1e-8], weight_decay=[0.0, 0.1, 0.0, 0.01],
                          amsgrad=[False, True, False, True]) for name in ("Adam", "AdamW")}


@pytest.mark.parametrize("name", NAMES + list(MASKED_ALSO))
def test_skipped_and_nonfinite_slots_stay_bit_exact(name):
    """A slot skipped from its very first step (eps=0 there: 0/0 must not appear) and a slot with a NaN
    gradient keep parameters, state, step count and per-slot scalars bit for bit; the others move."""
    kw = dict(CONFIGS[name]) if name in CONFIGS else dict(MASKED_ALSO[name])
    if "eps" in kw:
        kw["eps"] = [kw["eps"][0], 0.0, kw["eps"][2], kw["eps"][3]]
    mb = rmb.ModelBatch(make_models(S))
    opt = getattr(rmb.optim, name)(mb, **kw)
    skip = torch.tensor([False, True, False, False])
    fresh = snapshot(mb, opt, 1)
    for step, (x, y) in enumerate(batches(6)):
        mb.zero_grad()
        losses, _ = mb.forward_loss(x, y, nn.functional.mse_loss)
        losses.sum().backward()
        if step == 4:
            mb.params["0.weight"].grad[3, 0, 0] = float("nan")
            before = snapshot(mb, opt, 3)
            moving = snapshot(mb, opt, 0)
        opt.step(None, skip=skip)  # every row goes through the update: masking is by coefficients
        if step == 4:
            assert_bit_equal(snapshot(mb, opt, 3), before)
            assert bool(opt.last_nonfinite[3]) and not bool(opt.last_nonfinite[0])
            assert not torch.equal(snapshot(mb, opt, 0)["optim.steps"], moving["optim.steps"])
    assert_bit_equal(snapshot(mb, opt, 1), fresh)
    assert opt.steps.tolist() == [6.0, 0.0, 6.0, 5.0]


@pytest.mark.parametrize("name", NAMES)
def test_slot_state_round_trip_continues_identically(name):
    """Export slot 1 mid-training, import it into slot 0 of another batch: both continue identically."""
    mb = rmb.ModelBatch(make_models(3))
    kw = {k: v[:3] for k, v in CONFIGS[name].items()}
    opt = getattr(rmb.optim, name)(mb, **kw)
    data = batches(10)
    for x, y in data[:5]:
        fused_step(mb, opt, x, y)
    model_state, opt_state = mb.slot_state(1), opt.slot_state(1)
    assert set(opt_state["scalars"]) >= set(type(opt).SLOT_SCALARS)

    other = rmb.ModelBatch(make_models(2))
    other_opt = getattr(rmb.optim, name)(other, lr=0.5)  # every hyperparameter differs until loaded
    other.load_slot(0, model_state)
    other_opt.load_slot_state(0, opt_state)
    other.deactivate(1)
    for x, y in data[5:]:
        fused_step(mb, opt, x, y)
        fused_step(other, other_opt, x, y)
    for k, v in mb.slot_state(1).items():
        torch.testing.assert_close(other.slot_state(0)[k], v, rtol=1e-6, atol=0)
    mine, theirs = opt.slot_state(1), other_opt.slot_state(0)
    assert mine["steps"] == theirs["steps"] == 10
    assert theirs["scalars"] == pytest.approx(mine["scalars"], rel=1e-12)
    assert other_opt.get_hparams(0) == opt.get_hparams(1)


def test_slot_state_survives_a_weights_only_checkpoint():
    """Trial checkpoints keep plain types only (inf as "inf", dataclasses as dicts): the per-slot scalars,
    the schedule and the plateau rule still load back, hyperparameters included."""
    from ray_modelbatch import checkpoint

    mb = rmb.ModelBatch(make_models(2))
    opt = rmb.optim.NAdam(mb, lr=[0.01, 0.02], schedule=rmb.optim.schedules.multi_step([[2, 5], [3]]),
                          plateau=[rmb.optim.schedules.plateau(mode="max", patience=2), None])
    for x, y in batches(3):
        fused_step(mb, opt, x, y)
    for i in range(2):
        saved = checkpoint.from_bytes(checkpoint.to_bytes({"optimizer": opt.slot_state(i)}))["optimizer"]
        other = rmb.optim.NAdam(rmb.ModelBatch(make_models(1)))
        other.load_slot_state(0, saved)
        assert other.get_hparams(0) == opt.get_hparams(i)
        assert {k: float(v[0]) for k, v in other.scalars.items()} == {k: float(v[i]) for k, v in opt.scalars.items()}


def test_slot_state_of_another_optimizer_does_not_load():
    mb = rmb.ModelBatch(make_models(2))
    nadam_state = rmb.optim.NAdam(mb).slot_state(0)
    with pytest.raises(HyperparameterError, match="another optimizer"):
        rmb.optim.Adam(rmb.ModelBatch(make_models(2))).load_slot_state(0, nadam_state)
    adam_state = rmb.optim.Adam(rmb.ModelBatch(make_models(2))).slot_state(0)
    with pytest.raises(HyperparameterError, match="mu_product"):
        rmb.optim.NAdam(rmb.ModelBatch(make_models(2))).load_slot_state(0, adam_state)


@pytest.mark.parametrize("name", NAMES)
def test_copy_slot_and_resize_keep_state(name):
    """copy_slot (PBT exploit) carries all optimizer state: the copy then trains like its source.
    resize keeps every kept slot's state and starts new slots fresh."""
    mb = rmb.ModelBatch(make_models(3))
    opt = getattr(rmb.optim, name)(mb, **{k: v[:3] for k, v in CONFIGS[name].items()})
    data = batches(8)
    for x, y in data[:4]:
        fused_step(mb, opt, x, y)
    mb.copy_slot(0, 2)
    opt.set_hparams(2, **opt.get_hparams(0))  # hyperparameters are the trial's, set by the driver
    assert_bit_equal(snapshot(mb, opt, 2), snapshot(mb, opt, 0))
    for x, y in data[4:]:
        fused_step(mb, opt, x, y)
    a, b = snapshot(mb, opt, 0), snapshot(mb, opt, 2)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)

    kept = [snapshot(mb, opt, i) for i in range(3)]
    mb.resize(5)
    for i in range(3):
        assert_bit_equal(snapshot(mb, opt, i), kept[i])
    new = opt.slot_tensors()
    assert new["optim.steps"][3:].tolist() == [0.0, 0.0]
    for k, init in opt._scalar_init.items():
        assert new[f"optim.{k}"][3:].tolist() == [init, init]
    mb.resize(2, keep=[2, 0])
    assert_bit_equal(snapshot(mb, opt, 0), kept[2])
    assert_bit_equal(snapshot(mb, opt, 1), kept[0])


def test_adagrad_accumulator_starts_at_initial_value_on_reset_resize_and_new_hparams():
    init = [0.0, 0.1, 1.0]
    mb = rmb.ModelBatch(make_models(3))
    opt = rmb.optim.Adagrad(mb, lr=0.1, initial_accumulator_value=init)
    acc = opt.state[torch.float32]["sum"]
    assert acc[:, 0].tolist() == pytest.approx(init)
    for x, y in batches(3):
        fused_step(mb, opt, x, y)
    assert float(acc[2].min()) > 1.0
    mb.reset_slot(2, make_models(1)[0])
    assert torch.equal(acc[2], torch.full_like(acc[2], 1.0)) and float(opt.steps[2]) == 0
    trained = acc[1].clone()
    opt.set_hparams([1, 2], initial_accumulator_value=0.25)  # slot 2 has not stepped since: refilled
    assert acc[2].unique().tolist() == [0.25] and torch.equal(acc[1], trained)  # slot 1 has: kept
    grown = rmb.optim.Adagrad(rmb.ModelBatch(make_models(2)), initial_accumulator_value=0.3)
    grown.mb.resize(4)
    assert grown.state[torch.float32]["sum"][2:].unique().tolist() == pytest.approx([0.3])


def test_new_optimizers_reject_bad_hyperparameters_naming_the_slot():
    mb = rmb.ModelBatch(make_models(3))
    with pytest.raises(HyperparameterError, match=r"invalid alpha for slot\(s\) \[2\]"):
        rmb.optim.RMSprop(mb, alpha=[0.9, 0.9, 1.5])
    with pytest.raises(HyperparameterError, match=r"initial_accumulator_value for slot\(s\) \[0\]"):
        rmb.optim.Adagrad(mb, initial_accumulator_value=[-1.0, 0.0, 0.0])
    with pytest.raises(HyperparameterError, match="beta2"):
        rmb.optim.RAdam(mb, betas=[(0.9, 0.99), (0.9, 1.0), (0.9, 0.99)])
    with pytest.raises(HyperparameterError, match="momentum_decay"):
        rmb.optim.NAdam(mb, momentum_decay=-1.0)
    with pytest.raises(HyperparameterError, match="no hyperparameter 'momentum'"):
        rmb.optim.Adamax(mb, momentum=0.9)


@pytest.mark.parametrize("name", NAMES)
def test_defaults_and_get_hparams_are_torchs(name):
    mb = rmb.ModelBatch(make_models(2))
    got = getattr(rmb.optim, name)(mb).get_hparams(1)
    want = getattr(torch.optim, name)(nn.Linear(2, 2).parameters()).defaults
    for k, v in got.items():
        if k in want:
            assert v == pytest.approx(want[k]), k
    assert got["schedule"].kind == "constant" and got["plateau"] is None
    assert set(got) == set(getattr(rmb.optim, name)(mb).public_hparams())
    assert math.isinf(got["max_grad_norm"])
