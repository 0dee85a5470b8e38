"""A training step and an eval step written for one model, fused over slots (issue 11, item 1).

The reference is always the same function applied to one model alone, with
``torch.optim`` and the trial's own config: a fused slot must end with the
same parameters (float tolerance) and report the same values.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import FusedEngine, ModelBatch, optim
from ray_modelbatch.errors import FusionError
from ray_modelbatch.slot_group import SlotGroup, stack_key
from ray_modelbatch.step_config import RecordingConfig, SlotConfigs, tensor_paths
from ray_modelbatch.trial_settings import unread_settings
from ray_modelbatch.tune.spec import SlotSpec

S, B, STEPS = 3, 16, 12


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(240, 8, generator=g)
    y = torch.randint(0, 4, (240,), generator=g)
    return x[:200], y[:200], x[200:], y[200:]


def regularized_two_forward(model, batch, config):
    """Cross-entropy on the batch and on a scaled copy (two forward calls), plus an L2 penalty."""
    x, y = batch
    out = model(x)
    second = model(0.5 * x)
    penalty = sum(p.pow(2).sum() for p in model.parameters())
    loss = F.cross_entropy(out, y) + 0.5 * F.cross_entropy(second, y) + config["l2"] * penalty
    return {"loss": loss, "penalty": penalty, "acc": (out.argmax(-1) == y).float().mean()}


def evaluate(model, batch, config):
    x, y = batch
    out = model(x)
    return {"accuracy": (out.argmax(-1) == y).float().mean(), "nll": F.cross_entropy(out, y)}


CONFIGS = [{"l2": 0.0, "lr": 0.01}, {"l2": 1e-3, "lr": 0.02}, {"l2": 1e-2, "lr": 0.005}]


def _solo(model: nn.Module, config: dict, batches: list) -> tuple[nn.Module, list[dict]]:
    """The reference: the step as a user runs it on one model with torch.optim.Adam."""
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=config["lr"])
    outs = []
    for batch in batches:
        opt.zero_grad()
        out = regularized_two_forward(model, batch, config)
        out["loss"].backward()
        opt.step()
        outs.append({k: float(v.detach()) for k, v in out.items()})
    return model, outs


def test_train_step_trains_each_slot_like_the_step_on_one_model():
    torch.manual_seed(0)
    models = [_model() for _ in range(S)]
    mb = ModelBatch(models)
    opt = optim.Adam(mb, lr=[c["lr"] for c in CONFIGS])
    configs = SlotConfigs(S, [("l2",)], torch.float32, torch.device("cpu"))
    for i, c in enumerate(CONFIGS):
        configs.set(i, c)
    engine = FusedEngine(mb, opt, step_fn=regularized_two_forward, configs=configs)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, S, B, 8, generator=g)
    ys = torch.randint(0, 4, (STEPS, S, B), generator=g)
    fused = [engine.train_step(xs[t], ys[t], per_slot=True) for t in range(STEPS)]
    for i in range(S):
        ref, outs = _solo(models[i], CONFIGS[i], [(xs[t, i], ys[t, i]) for t in range(STEPS)])
        got = mb.slot_module(i, _model())
        for (name, a), b in zip(got.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"slot {i} {name}")
        for t in range(STEPS):
            assert fused[t].losses[i].item() == pytest.approx(outs[t]["loss"], rel=1e-5, abs=1e-6)
            assert fused[t].extras["penalty"][i].item() == pytest.approx(outs[t]["penalty"], rel=1e-5)
            assert fused[t].extras["acc"][i].item() == pytest.approx(outs[t]["acc"])


def test_noise_drawn_inside_the_step_is_independent_per_slot_and_trains():
    """Random draws inside a fused step differ between slots (torch.vmap randomness='different') and
    repeat with the global seed; they are not the numbers a solo run would draw."""

    def noisy(model, batch, config):
        x, y = batch
        return F.cross_entropy(model(x + config["noise"] * torch.randn_like(x)), y)

    def run(seed: int) -> tuple[torch.Tensor, list[float]]:
        torch.manual_seed(0)
        first = _model()
        mb = ModelBatch([first, copy.deepcopy(first)])  # two identical slots, identical batches
        configs = SlotConfigs(2, [("noise",)], torch.float32, torch.device("cpu"))
        configs.set(0, {"noise": 0.3})
        configs.set(1, {"noise": 0.3})
        engine = FusedEngine(mb, optim.SGD(mb, lr=0.1), step_fn=noisy, configs=configs)
        x, y, *_ = _data()
        torch.manual_seed(seed)
        losses = [engine.train_step(x[:64], y[:64]).losses for _ in range(30)]
        return losses[0], [float(l.mean()) for l in losses]

    first, curve = run(5)
    assert first[0] != first[1]  # same model, same batch, same config: only the noise differs
    assert curve[-1] < curve[0]
    again, curve2 = run(5)
    assert torch.equal(first, again) and curve == curve2


def _spec(**kw) -> SlotSpec:
    kw.setdefault("train_step", regularized_two_forward)
    kw.setdefault("eval_step", evaluate)
    kw.setdefault("optimizer", optim.Adam)
    kw.setdefault("batch_size", B)
    return SlotSpec(model=lambda c: None, hparams=lambda c: {}, loss=None, data=lambda: None, steps_per_report=3, **kw)


def _group(spec: SlotSpec, config: dict, n: int = 4) -> SlotGroup:
    torch.manual_seed(0)
    first = _model()
    return SlotGroup(spec, stack_key(first), first, _data(), n, "cpu", config=config)


def test_results_carry_the_users_own_metric_names():
    group = _group(_spec(), CONFIGS[0])
    torch.manual_seed(0)
    slots = [group.add(f"t{i}", _model(), seed=i, hparams={"lr": c["lr"]}, config=c) for i, c in enumerate(CONFIGS)]
    done = []
    while not done:
        done = group.step(slots)
    results = group.finish(done)
    for s in slots:
        r = results[s]
        assert {"accuracy", "nll", "penalty", "acc", "train_loss"} <= set(r), sorted(r)
        assert not any(k.startswith("val_") for k in r), sorted(r)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["penalty"] > 0
    # the eval step's values are those of the function on one model with the slot's weights
    x_val, y_val = group.x_val, group.y_val
    for s in slots:
        with torch.no_grad():
            alone = evaluate(group.mb.slot_module(s, _model()).eval(), (x_val, y_val), CONFIGS[s])
        assert results[s]["nll"] == pytest.approx(float(alone["nll"]), rel=1e-5)
        assert results[s]["accuracy"] == pytest.approx(float(alone["accuracy"]))


def test_without_eval_step_the_train_step_is_evaluated_on_validation_data():
    group = _group(_spec(eval_step=None), CONFIGS[0])
    slot = group.add("t", _model(), seed=0, hparams={}, config=CONFIGS[1])
    res = group.evaluate([slot])
    assert set(res) == {"loss", "penalty", "acc"}


def test_values_a_step_reads_decide_what_shares_a_stack():
    def steps_by_config(model, batch, config):
        x, y = batch
        loss = 0.0
        for _ in range(config["n_forward"]):  # an int read by the step: equal within a stack
            loss = loss + F.cross_entropy(model(x), y)
        return loss * config["scale"]  # a float: per-slot tensor, may differ

    base = {"n_forward": 2, "scale": 1.0, "unused": "x"}
    group = _group(_spec(train_step=steps_by_config, eval_step=None), base)
    assert group.reads == {("n_forward",), ("scale",)}
    assert group.configs.float_paths == [("scale",)]
    assert group.accepts({**base, "scale": 0.3, "unused": "y"})
    assert not group.accepts({**base, "n_forward": 3})


def test_batch_size_and_optimizer_chosen_by_the_config_split_stacks():
    spec = _spec(batch_size=lambda c: c["batch_size"],
                 optimizer=lambda c: {"sgd": functools.partial(optim.SGD, momentum=0.9), "adam": optim.Adam}[c["opt"]])
    config = {"batch_size": 8, "opt": "sgd", "l2": 0.0}
    group = _group(spec, config)
    assert group.batch_size == 8 and isinstance(group.opt, optim.SGD)
    assert group.accepts({**config, "l2": 0.5})
    assert not group.accepts({**config, "batch_size": 16})
    assert not group.accepts({**config, "opt": "adam"})
    xb, _ = group.streams.next_batch([0])
    assert xb.shape[1] == 8


def test_float_used_in_control_flow_names_stack_by():
    def branchy(model, batch, config):
        x, y = batch
        if config["p"] > 0.5:
            x = x * 2
        return F.cross_entropy(model(x), y)

    with pytest.raises(FusionError, match="stack_by"):
        _group(_spec(train_step=branchy, eval_step=None), {"p": 0.7})
    group = _group(_spec(train_step=branchy, eval_step=None, stack_by=["p"]), {"p": 0.7})
    assert group.configs.float_paths == [] and not group.accepts({"p": 0.2}) and group.accepts({"p": 0.7})


def test_a_step_that_returns_the_wrong_thing_says_so_in_one_line():
    def no_loss(model, batch, config):
        return {"acc": model(batch[0]).mean()}

    def vector(model, batch, config):
        return F.cross_entropy(model(batch[0]), batch[1], reduction="none")

    for fn, needle in ((no_loss, "'loss' entry"), (vector, "scalar tensor")):
        with pytest.raises(TypeError, match=needle) as info:
            _check_step(fn)
        assert "\n" not in str(info.value)


def _check_step(fn) -> None:
    from ray_modelbatch.engine import split_step_output

    mb = ModelBatch([_model(), _model()])
    x, y, *_ = _data()
    split_step_output(mb.run_step(fn, (x[:4], y[:4]), {}), "train_step")


def test_recording_config_sees_reads_through_copies_and_nesting():
    reads: set = set()
    cfg = RecordingConfig({"a": 1, "arch": {"width": 8, "depth": 2}, "lr": 0.1}, reads)
    copied = dict(cfg)
    _ = copied["arch"]["width"]
    assert reads == {("a",), ("lr",), ("arch", "width")}
    assert tensor_paths(reads, [{"a": 1, "lr": 0.1, "arch": {"width": 8}}]) == [("lr",)]
    assert unread_settings({"batch_size": 32, "lr": 0.1, "other": 1}, {("lr",)}) == ["batch_size"]


def test_reduce_lr_on_plateau_steps_on_the_reported_metric():
    from ray_modelbatch.optim import schedules

    spec = _spec(eval_step=evaluate, plateau_metric="nll")
    group = _group(spec, CONFIGS[0])
    rule = schedules.plateau(mode="min", factor=0.5, patience=0)
    slot = group.add("t", _model(), seed=0, hparams={"lr": 0.01, "plateau": rule}, config=CONFIGS[0])
    other = group.add("u", _model(), seed=1, hparams={"lr": 0.01}, config=CONFIGS[1])
    seen = []
    for _ in range(6):
        done = []
        while not done:
            done = group.step([slot, other])
        res = group.finish(done)
        seen.append((res[slot]["nll"], res[slot]["lr"], res[other]["lr"]))
    # every report that does not improve on the best nll halves the next lr (patience 0); the other slot keeps its own
    best, lr = float("inf"), 0.01
    for nll, got_lr, other_lr in seen:
        if nll >= best * (1 - 1e-4):
            lr *= 0.5
        best = min(best, nll)
        assert got_lr == pytest.approx(lr) and other_lr == pytest.approx(0.01)
    with pytest.raises(KeyError, match="plateau_metric"):
        bad = _group(_spec(eval_step=evaluate), CONFIGS[0])
        s = bad.add("t", _model(), seed=0, hparams={"plateau": rule}, config=CONFIGS[0])
        done = []
        while not done:
            done = bad.step([s])
        bad.finish(done)


def test_an_optimizer_factory_of_a_modelbatch_is_named_in_one_line():
    from ray_modelbatch.errors import TrialConfigError
    from ray_modelbatch.trial_settings import resolve_optimizer

    with pytest.raises(TrialConfigError, match="a function config -> class") as info:
        resolve_optimizer(lambda mb: optim.Adam(mb, lr=1e-3), {"lr": 1e-3})
    assert "\n" not in str(info.value)


def test_a_steps_own_raise_keeps_its_type_and_an_ops_failure_is_explained():
    """A user's ``raise``/``assert`` in a step is their exception, with a note of where it ran; advice on fusing
    is for what torch raises, such as reading a value in Python."""
    mb = ModelBatch([_model() for _ in range(S)])
    x, y = torch.randn(B, 8), torch.randint(0, 4, (B,))

    def refuses(model, batch, config):
        raise ValueError("my step refuses this config")

    engine = FusedEngine(mb, optim.SGD(mb, lr=0.1), step_fn=refuses)
    with pytest.raises(ValueError, match="my step refuses this config") as info:
        engine.train_step(x, y)
    assert not isinstance(info.value, FusionError)
    assert any("run once for 3 fused models under torch.vmap" in n for n in info.value.__notes__)

    def reads_a_value(model, batch, config):
        loss = F.cross_entropy(model(batch[0]), batch[1])
        return loss * 0 if loss.item() > 100 else loss

    engine = FusedEngine(mb, optim.SGD(mb, lr=0.1), step_fn=reads_a_value)
    with pytest.raises(FusionError, match=r"calls \.item\(\)"):
        engine.train_step(x, y)
