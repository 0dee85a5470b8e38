"""Models trained in parts with their own optimizers, updated alternately (a GAN; issue 11, item 1)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import FusedEngine, ModelBatch, optim
from ray_modelbatch.model_parts import OptimizerSet, PartView
from ray_modelbatch.step_config import SlotConfigs

S, B, Z, STEPS = 3, 16, 4, 10


def gan() -> nn.ModuleDict:
    return nn.ModuleDict({
        "G": nn.Sequential(nn.Linear(Z, 16), nn.Tanh(), nn.Linear(16, 8)),
        "D": nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1)),
    })


def d_step(model, batch, config):
    real, z = batch
    fake = model["G"](z).detach()
    ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
    loss = (F.binary_cross_entropy_with_logits(model["D"](real), ones)
            + F.binary_cross_entropy_with_logits(model["D"](fake), zeros))
    return {"loss": loss, "d_real": torch.sigmoid(model["D"](real)).mean()}


def g_step(model, batch, config):
    real, z = batch
    return F.binary_cross_entropy_with_logits(model["D"](model["G"](z)), torch.ones(real.shape[0], 1))


LRS = [{"G": 2e-3, "D": 1e-3}, {"G": 1e-3, "D": 3e-3}, {"G": 5e-4, "D": 5e-4}]


def test_each_part_steps_with_its_own_optimizer_in_order_like_a_solo_gan_loop():
    torch.manual_seed(0)
    models = [gan() for _ in range(S)]
    mb = ModelBatch(models)
    adam = functools.partial(optim.Adam, betas=(0.5, 0.999))
    opt = OptimizerSet(mb, {"D": adam, "G": adam})
    for i, lr in enumerate(LRS):
        opt.set_hparams(i, D={"lr": lr["D"]}, G={"lr": lr["G"]})
    engine = FusedEngine(mb, opt, step_fn={"D": d_step, "G": g_step}, configs=SlotConfigs(S, [], torch.float32, "cpu"))
    g = torch.Generator().manual_seed(1)
    real = torch.randn(STEPS, S, B, 8, generator=g)
    z = torch.randn(STEPS, S, B, Z, generator=g)
    results = [engine.train_step(real[t], z[t], per_slot=True) for t in range(STEPS)]
    assert set(results[0].extras) == {"loss_D", "loss_G", "d_real"}
    for i in range(S):
        solo = copy.deepcopy(models[i])
        opt_d = torch.optim.Adam(solo["D"].parameters(), lr=LRS[i]["D"], betas=(0.5, 0.999))
        opt_g = torch.optim.Adam(solo["G"].parameters(), lr=LRS[i]["G"], betas=(0.5, 0.999))
        for t in range(STEPS):
            batch = (real[t, i], z[t, i])
            opt_d.zero_grad()
            d = d_step(solo, batch, {})["loss"]
            d.backward()
            opt_d.step()
            opt_g.zero_grad()
            gl = g_step(solo, batch, {})
            gl.backward()
            opt_g.step()
            assert results[t].extras["loss_D"][i].item() == pytest.approx(d.item(), rel=1e-5)
            assert results[t].extras["loss_G"][i].item() == pytest.approx(gl.item(), rel=1e-5)
        got = mb.slot_module(i, gan())
        for (name, a), b in zip(got.named_parameters(), solo.parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"slot {i} {name}")


def test_a_part_optimizer_sees_only_its_columns_and_state_round_trips():
    mb = ModelBatch([gan(), gan()])
    view = PartView(mb, "D")
    (group,) = view.groups.values()
    assert group.names[0] == "D.0.weight" and group.numel == 8 * 16 + 16 + 16 + 1
    opt = OptimizerSet(mb, {"D": optim.Adam, "G": optim.SGD})
    assert opt.parts["D"].state[torch.float32]["exp_avg"].shape == (2, group.numel)
    state = opt.slot_state(0)
    other = OptimizerSet(ModelBatch([gan(), gan()]), {"D": optim.Adam, "G": optim.SGD})
    other.load_slot_state(1, state)
    with pytest.raises(ValueError, match="parts"):
        other.load_slot_state(1, {"parts": {"D": state["parts"]["D"]}})
    with pytest.raises(ValueError, match="no trainable parameters under 'E'"):
        PartView(mb, "E")


def test_a_stack_of_gans_reports_checkpoints_and_restores():
    from ray_modelbatch.slot_group import SlotGroup, stack_key
    from ray_modelbatch.tune.spec import SlotSpec

    def realism(model, batch, config):
        real, z = batch
        return {"fake_mean_gap": (model["G"](z).mean(0) - real.mean(0)).abs().mean()}

    spec = SlotSpec(model=lambda c: None, optimizer={"D": optim.Adam, "G": optim.Adam},
                    hparams=lambda c: {"D": {"lr": c["lr_d"]}, "G": {"lr": c["lr_g"]}}, loss=None, data=lambda: None,
                    train_step={"D": d_step, "G": g_step}, eval_step=realism, batch_size=8, steps_per_report=2)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(64, 8, generator=g), torch.randn(64, Z, generator=g),
            torch.randn(16, 8, generator=g), torch.randn(16, Z, generator=g))
    torch.manual_seed(0)
    first = gan()
    group = SlotGroup(spec, stack_key(first), first, data, 4, "cpu", config={"lr_d": 1e-3, "lr_g": 1e-3})
    cfgs = [{"lr_d": 1e-3, "lr_g": 2e-3}, {"lr_d": 2e-3, "lr_g": 1e-3}]
    slots = [group.add(f"t{i}", gan(), seed=i, hparams=spec.hparams(c), config=c) for i, c in enumerate(cfgs)]
    assert group.opt.parts["G"].get_hparams(slots[0])["lr"] == pytest.approx(2e-3)
    done = []
    while not done:
        done = group.step(slots)
    results = group.finish(done)
    assert {"fake_mean_gap", "loss_D", "loss_G", "d_real", "train_loss"} <= set(results[slots[0]])
    blob = group.export(slots[0])
    group.load(slots[1], blob, spec.hparams(cfgs[1]))  # PBT: weights and both optimizers' state
    assert torch.equal(group.mb.groups[torch.float32].data[slots[0]], group.mb.groups[torch.float32].data[slots[1]])
    for part in ("D", "G"):
        st = group.opt.parts[part].state[torch.float32]["exp_avg"]
        assert torch.equal(st[slots[0]], st[slots[1]])
    assert group.opt.parts["D"].get_hparams(slots[1])["lr"] == pytest.approx(2e-3)  # the recipient's own lr
    from ray_modelbatch import checkpoint

    per_param = checkpoint.per_parameter(checkpoint.from_bytes(blob))
    assert per_param["G.0.weight"]["exp_avg"].shape == (16, Z) and per_param["D.2.bias"]["exp_avg"].shape == (1,)
