"""Parameter groups per slot, and torch's lr schedulers refused in one line (issue 13, item 5).

Each fused slot with ``param_groups`` must train exactly like its model alone
under ``torch.optim.<Same>([{"params": decay, ...}, {"params": no_decay, ...}])``,
with lr, weight decay and the group's values all different per slot.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch.errors import HyperparameterError
from ray_modelbatch.model_parts import OptimizerSet
from ray_modelbatch.optim import schedules, torch_compat
from ray_modelbatch.step_config import SlotConfigs

from conftest import clones, make_models, max_rel_diff

S, STEPS = 3, 10
WD = [0.1, 0.01, 0.05]  # the main group (weights)
GROUP_WD = [0.0, 0.02, 0.0]  # biases: no decay in slots 0 and 2, as the transformer recipe
SCALE = [0.1, 2.0, 0.5]  # biases' lr multiplier
NO_DECAY = {"params": lambda name, p: p.ndim < 2, "weight_decay": GROUP_WD, "lr_scale": SCALE}

# Per optimizer: the slots' lr and keywords that exercise its other paths, one value per slot.
CASES = {
    "SGD": ([0.05, 0.02, 0.1], dict(momentum=[0.9, 0.0, 0.5], nesterov=[True, False, False])),
    "Adam": ([1e-2, 3e-3, 2e-2], dict(amsgrad=[False, True, False])),
    "AdamW": ([1e-2, 3e-3, 2e-2], dict(betas=[(0.9, 0.999), (0.8, 0.99), (0.5, 0.9)])),
    "RMSprop": ([1e-2, 3e-3, 5e-3], dict(momentum=[0.0, 0.5, 0.9], centered=[True, False, True])),
    "Adagrad": ([5e-2, 1e-2, 2e-2], dict(lr_decay=[0.0, 0.01, 0.1])),
    "Adamax": ([1e-2, 3e-3, 2e-2], {}),
    "NAdam": ([1e-2, 3e-3, 2e-2], dict(decoupled_weight_decay=[False, True, False])),
    "RAdam": ([1e-2, 3e-3, 2e-2], dict(decoupled_weight_decay=[True, False, True])),
}


def _per_slot(kw: dict, i: int) -> dict:
    return {k: v[i] for k, v in kw.items()}


def _torch_groups(model: nn.Module, lr: float, wd: float, i: int) -> list[dict]:
    """The reference's param groups for slot ``i``: decay with its wd, no_decay with its wd and lr * scale."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": wd},
            {"params": no_decay, "weight_decay": GROUP_WD[i], "lr": lr * SCALE[i]}]


def _train(mb, opt, refs, ropts, scheds=(), steps=STEPS, seed=1):
    engine = rmb.FusedEngine(mb, opt, F.mse_loss)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
        engine.train_step(x, y)
        for r, o in zip(refs, ropts):
            o.zero_grad()
            F.mse_loss(r(x), y).backward()
            o.step()
        for s in scheds:
            s.step()


@pytest.mark.parametrize("name", list(CASES))
def test_each_optimizer_with_per_slot_groups_matches_torch_param_groups(name):
    """Per-slot lr, weight decay, group weight decay and group lr multiplier, under a per-slot-lr StepLR."""
    lrs, kw = CASES[name]
    models = make_models(S)
    refs = clones(models)
    mb = rmb.ModelBatch(models)
    opt = getattr(rmb.optim, name)(mb, lr=lrs, weight_decay=WD, param_groups=[NO_DECAY],
                                   schedule=schedules.step_decay(4, 0.5), **kw)
    ropts = [getattr(torch.optim, name)(_torch_groups(r, lrs[i], WD[i], i), lr=lrs[i], **_per_slot(kw, i))
             for i, r in enumerate(refs)]
    scheds = [torch.optim.lr_scheduler.StepLR(o, 4, 0.5) for o in ropts]
    _train(mb, opt, refs, ropts, scheds)
    assert max_rel_diff(mb, refs) < 1e-5


def test_declared_lr_coefficients_are_the_ones_that_move_with_lr():
    """Groups recompute only LR_COEFFICIENTS and the decay coefficients per group: a coefficient that
    moves with lr or weight decay and is not declared would silently use the main group's value."""
    for name, (lrs, kw) in CASES.items():
        opt = getattr(rmb.optim, name)(rmb.ModelBatch(make_models(S)), lr=lrs, weight_decay=WD, **kw)
        hp = {**opt.hp, **opt.scalars}
        steps, ok = torch.full((S,), 7.0, dtype=torch.float64), torch.ones(S, dtype=torch.float64)
        lr = hp["lr"]

        def moved(c_a, c_b):
            return {k for k, v in c_a.items() if isinstance(v, torch.Tensor) and k != "scalars"
                    and not torch.equal(v, c_b[k])}

        base = opt._coefficients(hp, steps, ok, lr)
        assert moved(base, opt._coefficients(hp, steps, ok, lr * 3)) <= {*opt.LR_COEFFICIENTS, "decay"}, name
        more_wd = {**hp, "weight_decay": hp["weight_decay"] * 3}
        assert moved(base, opt._coefficients(more_wd, steps, ok, lr)) <= {"wd", "decay"}, name


def test_kernel_count_does_not_grow_with_slots_and_cache_tiles_change_nothing(monkeypatch):
    """Groups add a fixed number of kernels per step whatever S; on CPU, tiles that straddle groups (column
    tiles of 7, row tiles of 150 elements) give bitwise the update of one tile."""
    from test_optim import CountOps

    from ray_modelbatch.optim import base

    counts = []
    for s in (2, 64):
        mb = rmb.ModelBatch(make_models(s))
        opt = rmb.optim.AdamW(mb, lr=[0.01] * s, param_groups=[{"params": ["0.bias"], "lr_scale": 0.5},
                                                               {"params": ["2.bias"], "weight_decay": 0.0}])
        losses, _ = mb.forward_loss(torch.randn(4, 5), torch.randn(4, 3), F.mse_loss)
        losses.sum().backward()
        with CountOps() as c:
            opt.step()
        counts.append(c.count)
    assert counts[0] == counts[1]

    def run(tile_elements):
        monkeypatch.setattr(base, "CPU_TILE_ELEMENTS", tile_elements)
        torch.manual_seed(0)
        mb = rmb.ModelBatch(make_models(S))
        opt = rmb.optim.NAdam(mb, lr=1e-2, weight_decay=WD, param_groups=[NO_DECAY], decoupled_weight_decay=True)
        _train(mb, opt, [], [], steps=3)
        return mb.groups[torch.float32].data.clone()

    one = run(1 << 30)
    for tile in (7, 150):
        assert torch.equal(run(tile), one), tile


def test_compiled_update_picks_groups_like_the_eager_one():
    """compile=True selects each column's group inside the one fused pass (also for a gather of slots)."""
    out = []
    for compiled in (False, True):
        torch.manual_seed(0)
        mb = rmb.ModelBatch(make_models(S))
        opt = rmb.optim.AdamW(mb, lr=[1e-2, 3e-3, 2e-2], weight_decay=WD, param_groups=[NO_DECAY], compile=compiled)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
            opt.zero_grad()
            losses, _ = mb.forward_loss(x, y, F.mse_loss)
            losses.sum().backward()
            opt.step(slots=[0, 2] if step % 2 else "active")
        assert (opt._compiled is not None) == compiled, "torch.compile fell back to eager"
        out.append(mb.groups[torch.float32].data.clone())
    torch.testing.assert_close(out[1], out[0], atol=1e-6, rtol=1e-6)


def test_names_lists_skipped_slots_and_groups_set_later():
    """Groups by name; a slot with a non-finite gradient stays as it was; groups set by set_hparams on an
    optimizer without them leave the other slots training exactly as before."""
    models = make_models(S)
    refs = clones(models)
    mb = rmb.ModelBatch(models)
    opt = rmb.optim.AdamW(mb, lr=1e-2, weight_decay=WD)
    opt.set_hparams(1, param_groups=[{"params": ["0.bias", "2.bias"], "weight_decay": 0.0, "lr_scale": 0.5}])
    assert opt.get_hparams(0)["param_groups"] == [{"params": ["0.bias", "2.bias"], "lr_scale": 1.0,
                                                   "weight_decay": WD[0]}]
    ropts = []
    for i, r in enumerate(refs):
        if i == 1:
            groups = [{"params": [r[0].weight, r[2].weight]},
                      {"params": [r[0].bias, r[2].bias], "weight_decay": 0.0, "lr": 0.5e-2}]
        else:
            groups = r.parameters()
        ropts.append(torch.optim.AdamW(groups, lr=1e-2, weight_decay=WD[i]))
    _train(mb, opt, refs, ropts)
    assert max_rel_diff(mb, refs) < 1e-5

    before = mb.groups[torch.float32].data.clone()
    mb.sync_grads()  # the flat buffer holds the gradients from here on
    mb.groups[torch.float32].grad.fill_(1.0)
    mb.groups[torch.float32].grad[2, 3] = float("nan")
    opt.step()
    after = mb.groups[torch.float32].data
    assert torch.equal(after[2], before[2]) and not torch.equal(after[0], before[0])
    assert opt.last_nonfinite.tolist() == [False, False, True]


def test_checkpoints_round_trip_groups_and_continue_identically():
    x, y = torch.randn(16, 5), torch.randn(16, 3)

    def step(opt, mb):
        opt.zero_grad()
        losses, _ = mb.forward_loss(x, y, F.mse_loss)
        losses.sum().backward()
        opt.step()

    mb = rmb.ModelBatch(make_models(S))
    opt = rmb.optim.NAdam(mb, lr=[1e-2, 2e-2, 3e-3], weight_decay=WD, param_groups=[NO_DECAY])
    for _ in range(3):
        step(opt, mb)

    # state_dict into an optimizer built without groups: the groups come with it
    saved, weights = opt.state_dict(), mb.groups[torch.float32].data.clone()
    mb2 = rmb.ModelBatch(make_models(S))
    mb2.groups[torch.float32].data.copy_(weights)
    opt2 = rmb.optim.NAdam(mb2, lr=1e-3)
    opt2.load_state_dict(saved)
    for _ in range(3):
        step(opt, mb)
        step(opt2, mb2)
    assert torch.equal(mb.groups[torch.float32].data, mb2.groups[torch.float32].data)

    # one slot exported and imported (a trial checkpoint, a PBT copy): values and membership come along
    exported = rmb.checkpoint.from_bytes(rmb.checkpoint.to_bytes({"opt": opt.slot_state(1)}))["opt"]
    other = rmb.optim.NAdam(rmb.ModelBatch(make_models(2)), lr=1e-3)
    other.load_slot_state(0, exported)
    assert other.get_hparams(0)["param_groups"] == opt.get_hparams(1)["param_groups"] == [
        {"params": ["0.bias", "2.bias"], "lr_scale": SCALE[1], "weight_decay": GROUP_WD[1]}]
    assert other.get_hparams(1)["param_groups"][0]["lr_scale"] == 1.0  # the slot not loaded: as without groups
    other.mb.resize(4)
    assert other.get_hparams(3)["param_groups"][0]["lr_scale"] == 1.0

    by_name = rmb.optim.NAdam(rmb.ModelBatch(make_models(2)), param_groups=[{"params": ["0.bias"], "lr_scale": 0.1}])
    with pytest.raises(HyperparameterError, match="differ from this optimizer's"):
        by_name.load_slot_state(0, exported)
    with pytest.raises(HyperparameterError, match="this state_dict has param_groups"):
        by_name.load_state_dict({**saved, "num_slots": 2})


def test_group_errors_are_one_line():
    mb = rmb.ModelBatch(make_models(S))
    cases = [
        ([{"params": lambda n, p: p.ndim < 2}, {"params": ["2.bias"], "lr_scale": 0.1}],
         r"parameter '2.bias' is in param_groups\[0\] and param_groups\[1\]"),
        ([{"params": ["2.bais"]}], r"names parameters this optimizer does not update: \['2.bais'\]"),
        ([{"params": ["2.bias"], "lr": 1e-3}], r"sets \['lr'\]; a group sets only \['lr_scale', 'weight_decay'\] "
                                                r"\(use lr_scale"),
        ([{"params": ["2.bias"], "weight_decay": [0.0, -1.0, 0.0]}],
         r"invalid param_groups\[0\].weight_decay for slot\(s\) \[1\]"),
        ([{"weight_decay": 0.0}], "must be a dict with a 'params' entry"),
        ({"params": ["2.bias"]}, "param_groups must be a list of dicts"),
    ]
    for spec, message in cases:
        with pytest.raises(HyperparameterError, match=message) as info:
            rmb.optim.AdamW(mb, param_groups=spec)
        assert "\n" not in str(info.value)
    opt = rmb.optim.AdamW(mb, param_groups=[{"params": ["2.bias"], "lr_scale": 0.1}])
    with pytest.raises(HyperparameterError, match="differ from this optimizer's") as info:
        opt.set_hparams(0, param_groups=[{"params": ["0.bias", "2.bias"], "lr_scale": 0.1}])
    assert "\n" not in str(info.value)
    with pytest.raises(HyperparameterError, match="lr_scale"):
        opt.set_hparams(0, param_groups=[{"params": ["2.bias"], "lr_scale": -1.0}])
    assert opt.get_hparams(0)["param_groups"][0]["lr_scale"] == pytest.approx(0.1)  # a refused value changes nothing
    fresh = rmb.optim.AdamW(mb)
    with pytest.raises(HyperparameterError, match="lr_scale"):
        fresh.set_hparams(0, param_groups=[{"params": ["2.bias"], "lr_scale": -1.0}])
    assert fresh.get_hparams(0)["param_groups"] is None  # ... nor leaves half-made groups behind


# ------------------------------------------------------------ model parts and Tune
Z = 4


def gan() -> nn.ModuleDict:
    return nn.ModuleDict({"G": nn.Sequential(nn.Linear(Z, 8), nn.Tanh(), nn.Linear(8, 6)),
                          "D": nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))})


def d_step(model, batch, config):
    real, z = batch
    ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
    return (F.binary_cross_entropy_with_logits(model["D"](real), ones)
            + F.binary_cross_entropy_with_logits(model["D"](model["G"](z).detach()), zeros))


def g_step(model, batch, config):
    real, z = batch
    return F.binary_cross_entropy_with_logits(model["D"](model["G"](z)), torch.ones(real.shape[0], 1))


def test_a_part_optimizer_groups_its_own_parameters_like_torch():
    """The discriminator's biases (named without the part's prefix) in a group, per slot, in an alternating
    GAN step; the generator's optimizer has no groups."""
    torch.manual_seed(0)
    models = [gan() for _ in range(S)]
    refs = clones(models)
    mb = rmb.ModelBatch(models)
    d_group = {"params": ["0.bias", "2.bias"], "weight_decay": 0.0, "lr_scale": SCALE}
    opt = OptimizerSet(mb, {"D": lambda v: rmb.optim.AdamW(v, lr=1e-2, weight_decay=WD, param_groups=[d_group]),
                            "G": lambda v: rmb.optim.AdamW(v, lr=1e-2)})
    assert opt.get_hparams(2)["D"]["param_groups"][0]["params"] == ["D.0.bias", "D.2.bias"]
    assert opt.get_hparams(2)["G"]["param_groups"] is None
    engine = rmb.FusedEngine(mb, opt, step_fn={"D": d_step, "G": g_step},
                             configs=SlotConfigs(S, [], torch.float32, "cpu"))
    ropts = [(torch.optim.AdamW([{"params": [r["D"][0].weight, r["D"][2].weight]},
                                 {"params": [r["D"][0].bias, r["D"][2].bias], "weight_decay": 0.0,
                                  "lr": 1e-2 * SCALE[i]}], lr=1e-2, weight_decay=WD[i]),
              torch.optim.AdamW(r["G"].parameters(), lr=1e-2)) for i, r in enumerate(refs)]
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        real, z = torch.randn(8, 6, generator=g), torch.randn(8, Z, generator=g)
        engine.train_step(real, z)
        for r, (opt_d, opt_g) in zip(refs, ropts):
            for step, o in ((d_step, opt_d), (g_step, opt_g)):
                o.zero_grad()
                step(r, (real, z), {}).backward()
                o.step()
    for i, r in enumerate(refs):
        got = mb.slot_module(i, gan())
        for (name, a), b in zip(got.named_parameters(), r.parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"slot {i} {name}")


def test_tune_stacks_trials_by_group_membership_and_keeps_their_values():
    """hparams(config) returns param_groups: trials with the same membership share a stack with their own
    values; another membership (or none) goes to another stack; a model in parts is checked by part."""
    from ray_modelbatch.slot_group import SlotGroup, stack_key
    from ray_modelbatch.tune.spec import SlotSpec

    def hparams(c):
        groups = None if c["groups"] == "none" else [
            {"params": (lambda n, p: p.ndim < 2) if c["groups"] == "biases" else ["0.weight"],
             "weight_decay": 0.0, "lr_scale": c["scale"]}]
        return {"lr": c["lr"], "weight_decay": 0.1, "param_groups": groups}

    spec = SlotSpec(model=lambda c: None, optimizer=rmb.optim.AdamW, hparams=hparams, loss=F.mse_loss,
                    data=lambda: None, batch_size=8, steps_per_report=1)
    data = (torch.randn(32, 5), torch.randn(32, 3), torch.randn(8, 5), torch.randn(8, 3))
    first = make_models(1)[0]
    cfgs = [{"lr": 1e-2, "scale": 0.1, "groups": "biases"}, {"lr": 2e-2, "scale": 0.5, "groups": "biases"}]
    group = SlotGroup(spec, stack_key(first), first, data, 4, "cpu", config=cfgs[0])
    slots = [group.add(f"t{i}", make_models(1)[0], seed=i, hparams=hparams(c), config=c) for i, c in enumerate(cfgs)]
    assert [group.opt.get_hparams(s)["param_groups"][0]["lr_scale"] for s in slots] == pytest.approx([0.1, 0.5])
    assert group.accepts({"lr": 3e-3, "scale": 2.0, "groups": "biases"})
    assert not group.accepts({"lr": 3e-3, "scale": 2.0, "groups": "first_weight"})
    assert not group.accepts({"lr": 3e-3, "scale": 2.0, "groups": "none"})
    group.step(slots)  # the stack trains

    parts = SlotSpec(model=lambda c: None, optimizer={"D": rmb.optim.Adam, "G": rmb.optim.Adam},
                     hparams=lambda c: {"D": {"param_groups": [{"params": c["d"], "weight_decay": 0.0}]}, "G": {}},
                     loss=None, data=lambda: None, train_step={"D": d_step, "G": g_step}, batch_size=8)
    gan_data = (torch.randn(32, 6), torch.randn(32, Z), torch.randn(8, 6), torch.randn(8, Z))
    cfg = {"d": ["D.2.bias"]}
    stack = SlotGroup(parts, stack_key(gan()), gan(), gan_data, 4, "cpu", config=cfg)
    stack.add("g0", gan(), seed=0, hparams=parts.hparams(cfg), config=cfg)
    assert stack.accepts({"d": ["2.bias"]}) and not stack.accepts({"d": ["0.bias", "2.bias"]})


# ------------------------------------------------------------ torch's lr schedulers
L = torch.optim.lr_scheduler


@pytest.mark.parametrize("make, builtin", [
    (lambda o: L.StepLR(o, step_size=3), "schedules.step_decay(step_size, gamma)"),
    (lambda o: L.CosineAnnealingLR(o, T_max=10), "schedules.warmup_cosine(total_steps=T_max"),
    (lambda o: L.ExponentialLR(o, gamma=0.9), "schedules.exponential(gamma)"),
    (lambda o: L.MultiStepLR(o, milestones=[3]), "schedules.multi_step(milestones, gamma)"),
    (lambda o: L.OneCycleLR(o, max_lr=0.1, total_steps=10), "schedules.one_cycle(total_steps"),
    (lambda o: L.LinearLR(o), "schedules.linear(start_factor, end_factor, total_iters)"),
    (lambda o: L.ReduceLROnPlateau(o), "plateau=schedules.plateau("),
    (lambda o: L.LambdaLR(o, lambda t: 1.0), "schedules.warmup_linear(warmup_steps, total_steps)"),
    (lambda o: L.CyclicLR(o, 0.01, 0.1), "no per-slot equivalent"),
])
def test_torch_schedulers_are_refused_naming_the_per_slot_schedule(make, builtin):
    opt = rmb.optim.Adam(rmb.ModelBatch(make_models(2)), lr=1e-2)
    with pytest.raises(torch_compat.TorchSchedulerError, match="cannot drive the fused Adam") as info:
        make(opt)
    assert builtin in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, TypeError)  # what torch itself raises there


def test_hf_schedules_and_param_groups_habits_are_refused():
    opt = rmb.optim.AdamW(rmb.ModelBatch(make_models(2)))
    with pytest.raises(torch_compat.NoParamGroupsError, match=r"set_hparams\(slots, lr=...\)"):
        for group in opt.param_groups:
            group["lr"] = 0.1
    assert getattr(opt, "param_groups", None) is None  # an AttributeError: duck-typing code stays quiet
    assert not isinstance(opt, torch.optim.Optimizer) and isinstance(opt, rmb.optim.AdamW)
    transformers = pytest.importorskip("transformers")
    with pytest.raises(torch_compat.TorchSchedulerError, match="schedules.warmup_cosine"):
        transformers.get_cosine_schedule_with_warmup(opt, 10, 100)
