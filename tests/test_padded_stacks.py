"""Padded stacks: models that differ only in layer widths share a stack, each slot training as its model alone.

The reference for a padded slot is the same model in a stack of its own shapes (whose slots match
``torch.optim`` alone: test_run_ahead, test_model_batch): same seed, same batches, same hyperparameters.
"""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import optim, padded_stacks
from ray_modelbatch.errors import FusionError
from ray_modelbatch.signature import module_signature
from ray_modelbatch.slot_group import SlotGroup, stack_key
from ray_modelbatch.tune.spec import SlotSpec
from tune_helpers import ray_session, trainables  # noqa: F401 - shared fixtures

K = 3  # steps per iteration


class Net(nn.Module):
    """Tune's CIFAR tutorial's shape on 12 features: fixed input layer width, searched ``l1`` and ``l2``."""

    def __init__(self, l1: int, l2: int, act=F.relu, bn: bool = False, dropout: float = 0.0):
        super().__init__()
        self.act = act
        # No bias before a BatchNorm, as usual: its gradient is 0 in exact arithmetic, so Adam would scale the
        # rounding noise of any two computations (two stack sizes, too) into lr-sized, different steps.
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, l1, bias=not bn), nn.Linear(l1, l2), nn.Linear(l2, 4)
        self.norm = nn.BatchNorm1d(l1) if bn else nn.Identity()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.drop(self.act(self.fc2(self.act(self.norm(self.fc1(x)))))))


class ConvNet(nn.Module):
    """A convolution whose channel count is searched, a BatchNorm over it, a head on the flattened map."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.head = nn.Linear(12 * c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.norm(self.conv(x.view(-1, 1, 3, 4)))).flatten(1))


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 12, generator=g)
    y = torch.randint(0, 4, (200,), generator=g)
    return x, y, x[:40], y[:40]


def _spec(opt) -> SlotSpec:
    return SlotSpec(model=lambda c: None, hparams=lambda c: {}, data=lambda: None, batch_size=16,
                    steps_per_report=K, loss=F.cross_entropy, optimizer=opt,
                    metrics={"acc": lambda o, y: (o.argmax(-1) == y).float().mean()})


def _shapes(model: nn.Module) -> dict:
    return {s.name: s.shape for s in module_signature(model)}


def _build(make, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return make()


def _train(group: SlotGroup, iterations: int) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {s: [] for s in group.owner}
    for _ in range(iterations * K):
        for s, r in group.finish(group.step(sorted(group.owner))).items():
            out[s].append(r)
    return out


def _state(blob: bytes) -> dict:
    return torch.load(io.BytesIO(blob), weights_only=True)


def _close_results(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["slot_steps"] == y["slot_steps"]
        keys = [k for k in ("train_loss", "val_loss", "val_acc", "grad_norm") if k in y]
        assert "train_loss" in keys and keys == [k for k in keys if k in x]
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6), k


OPTIMIZERS = {
    "adamw": lambda mb: optim.AdamW(mb, lr=1e-2),
    "sgd_momentum": lambda mb: optim.SGD(mb, lr=5e-2, momentum=0.9, weight_decay=1e-3),
    "rmsprop": lambda mb: optim.RMSprop(mb, lr=1e-3),
}
MODELS = {
    "mlp": (lambda w: Net(*w), [(8, 16), (32, 8), (24, 24), (32, 24)]),
    "mlp_gelu_bn": (lambda w: Net(*w, act=F.gelu, bn=True), [(8, 16), (32, 8), (32, 24)]),
    "conv": (lambda w: ConvNet(w[0]), [(4,), (6,), (8,)]),
}


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
@pytest.mark.parametrize("family", list(MODELS))
def test_narrower_models_in_a_padded_stack_train_as_in_stacks_of_their_own(family, opt):
    make, widths = MODELS[family]
    widest = _shapes(make(widths[-1]))
    for w in widths:
        widest = padded_stacks.widest(widest, module_signature(make(w)))
    spec = _spec(OPTIMIZERS[opt])
    template = padded_stacks.pad_model(make(widths[-1]), widest)
    padded = SlotGroup(spec, "padded", template, _data(), len(widths), "cpu", run_ahead=1)
    alone = []
    for i, w in enumerate(widths):
        hp = {"lr": 1e-3 * (i + 2)}
        verdict = padded.fit(make(w))
        assert verdict is not None and verdict.ok, verdict
        padded.add(f"t{i}", _build(lambda: make(w), i), seed=10 + i, hparams=hp)
        own = _build(lambda: make(w), i)
        g = SlotGroup(spec, stack_key(own), own, _data(), 1, "cpu")
        g.add(f"t{i}", own, seed=10 + i, hparams=hp)
        alone.append(g)
    assert padded.mb.own_sizes[len(widths) - 1] is None or family == "mlp_gelu_bn"  # the widest is at the stack's
    got = _train(padded, 3)
    for i, g in enumerate(alone):
        _close_results(got[i], _train(g, 3)[0])
        mine, ref = _state(padded.export(i)), _state(g.export(0))
        assert mine["signature"] == ref["signature"]  # the checkpoint holds the model at its own shapes
        for k, v in ref["model"].items():
            torch.testing.assert_close(mine["model"][k], v, rtol=1e-5, atol=1e-6)
        for dt, st in ref["optimizer"]["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(mine["optimizer"]["state"][dt][k], v, rtol=1e-5, atol=1e-6)
        assert mine["optimizer_layout"] == ref["optimizer_layout"]
        make(widths[i]).load_state_dict(mine["model"])  # loads into the model class at its own widths


def test_a_narrow_slot_moves_between_a_padded_stack_and_one_of_its_own_shapes():
    """A checkpoint of a padded slot restores into a stack of the model's own shapes and into another padded
    stack (a pause and resume elsewhere, a PBT exploit), and trains on as the original does."""
    spec = _spec(OPTIMIZERS["adamw"])
    make = lambda: Net(8, 16)  # noqa: E731
    padded = SlotGroup(spec, "padded", padded_stacks.pad_model(Net(32, 24), _shapes(Net(32, 24))), _data(), 2, "cpu")
    padded.add("a", _build(make, 0), seed=3, hparams={"lr": 3e-3})
    padded.add("b", _build(lambda: Net(32, 24), 1), seed=4, hparams={"lr": 1e-3})
    _train(padded, 1)
    blob = padded.export(0)
    want = _train(padded, 2)[0]
    own = _build(make, 5)
    apart = SlotGroup(spec, stack_key(own), own, _data(), 1, "cpu")
    apart.add("a", own, seed=99, hparams={"lr": 3e-3})
    apart.load(0, blob, {"lr": 3e-3})
    _close_results(_train(apart, 2)[0], want)
    wider = SlotGroup(spec, "wider", padded_stacks.pad_model(Net(64, 32), _shapes(Net(64, 32))), _data(), 2, "cpu")
    wider.add("x", _build(lambda: Net(64, 32), 6), seed=7, hparams={"lr": 1e-3})
    wider.add("a", _build(make, 8), seed=9, hparams={"lr": 3e-3})
    wider.load(1, blob, {"lr": 3e-3})
    _close_results(_train(wider, 2)[1], want)
    with pytest.raises(Exception, match="another architecture"):
        wider.load(0, blob, {"lr": 3e-3})  # slot 0 holds a Net(64, 32): the checkpoint is not its model's


@pytest.mark.parametrize("make,reason", [
    (lambda w: Net(w, w, act=torch.sigmoid), "padded entries"),  # sigmoid(0) = 0.5 reaches fc3's padded inputs
    (lambda w: Net(w, w, dropout=0.3), "outputs differ"),  # masks drawn over the padded shape
])
def test_models_that_padding_would_change_are_not_padded(make, reason):
    verdict = padded_stacks.check(make(8), _shapes(make(32)), padded_stacks.unsized_settings(make(32)),
                                  padded_stacks.forward_runs(torch.randn(8, 12)))
    assert not verdict.ok and reason in verdict.reason
    group = SlotGroup(_spec(OPTIMIZERS["adamw"]), "g", make(32), _data(), 2, "cpu")
    with pytest.raises(FusionError, match="other shapes cannot join"):
        group.add("t", make(8), seed=0, hparams={})


def test_families_and_what_may_differ():
    class Normed(nn.Module):
        def __init__(self, h):
            super().__init__()
            self.a, self.norm, self.b = nn.Linear(12, h), nn.LayerNorm(h), nn.Linear(h, 4)

    class Stored(nn.Module):
        def __init__(self, h):
            super().__init__()
            self.h, self.a = h, nn.Linear(12, h)

    key = padded_stacks.family_key
    assert key(Net(8, 16)) == key(Net(64, 32)) != key(Net(8, 16, act=torch.tanh))
    assert key(Normed(8)) != key(Normed(16))  # LayerNorm's normalized_shape is not a width this module pads
    assert key(Stored(8)) != key(Stored(16))  # nor is a width the model keeps for its own forward
    assert padded_stacks.own_shapes(module_signature(Net(8, 16)), module_signature(Net(32, 8))) is None
    assert padded_stacks.own_shapes(module_signature(Net(32, 16)), module_signature(Net(8, 16))) == {
        "fc1.weight": (8, 12), "fc1.bias": (8,), "fc2.weight": (16, 8)}
    # the padded template's width attributes follow its tensors
    wide = padded_stacks.pad_model(Net(8, 16), {"fc1.weight": (32, 12), "fc1.bias": (32,), "fc2.weight": (16, 32)})
    assert (wide.fc1.out_features, wide.fc2.in_features, wide.fc2.out_features) == (32, 32, 16)


def test_padding_round_trips_and_counts_its_waste():
    t = torch.arange(6.0).view(2, 3)
    p = padded_stacks.pad(t, (4, 5))
    assert p.shape == (4, 5) and p.sum() == t.sum() and torch.equal(padded_stacks.unpad(p, (2, 3)), t)
    names, shapes, own = ["a", "b", "c"], [(4, 5), (3,), (2, 2)], {"a": (2, 3), "c": (1, 2)}
    flat = torch.arange(20 + 3 + 4, dtype=torch.float)
    cut = padded_stacks.unpad_flat(flat, names, shapes, own)
    assert cut.numel() == 6 + 3 + 2
    assert torch.equal(padded_stacks.unpad_flat(padded_stacks.pad_flat(cut, names, shapes, own), names, shapes, own),
                       cut)
    cifar = padded_stacks.check(Net(8, 8), _shapes(Net(64, 64)), padded_stacks.unsized_settings(Net(64, 64)),
                                padded_stacks.forward_runs(torch.randn(8, 12)))
    assert cifar.ok and cifar.waste == pytest.approx((12 * 64 + 64 * 64 + 64 * 4) / (12 * 8 + 8 * 8 + 8 * 4), rel=0.01)


def test_a_small_model_pads_at_any_ratio_where_the_extra_flops_are_few():
    """Where padding costs more than MAX_WASTE times the model's FLOPs, it still joins the stack if the padding
    adds at most SMALL_EXTRA_FLOPS to a training step (three forwards of a batch): the digits MLPs of the sweep
    (64-32-10 in a 128-wide stack: 4x the FLOPs, 2.7 MFLOP more at batch 64), not a 784-input one (58 MFLOP)."""
    def mlp(i: int, h: int) -> nn.Module:
        return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, 10))

    def verdict(i: int, small: int, big: int) -> padded_stacks.Verdict:
        wide = mlp(i, big)
        return padded_stacks.check(mlp(i, small), _shapes(wide), padded_stacks.unsized_settings(wide),
                                   padded_stacks.forward_runs(torch.randn(8, i)))

    digits, mnist = verdict(64, 32, 128), verdict(784, 64, 256)
    for v in (digits, mnist):
        assert v.ok and v.waste > padded_stacks.MAX_WASTE and v.waste == pytest.approx(4.0, rel=0.05)
    assert digits.extra_flops == 2 * 8 * (64 * 96 + 96 * 10)  # multiply-adds of the padded units, on 8 rows
    assert padded_stacks.worth_it(digits, rows=8, batch_size=64)  # 2.7 MFLOP a step
    assert not padded_stacks.worth_it(digits, rows=8, batch_size=1024)  # 44 MFLOP a step: no longer small
    assert not padded_stacks.worth_it(mnist, rows=8, batch_size=64)
    close = verdict(64, 96, 128)
    assert close.waste <= padded_stacks.MAX_WASTE and padded_stacks.worth_it(close, rows=8, batch_size=10**6)
    assert not padded_stacks.worth_it(None, 8, 64)
    assert not padded_stacks.worth_it(padded_stacks.Verdict(False, extra_flops=0.0), 8, 64)
    # a stack judges by its own batch size, from the rows its check ran on (12-8-8-4 in 12-64-64-4: 26.7x the
    # FLOPs, 9,856 more a row: 0.47 MFLOP a step at batch 16, 4.7 at 160)
    for batch, cheap in ((16, True), (160, False)):
        spec = dataclasses.replace(_spec(lambda mb: optim.Adam(mb, lr=1e-3)), batch_size=batch)
        g = SlotGroup(spec, "wide", Net(64, 64), _data(), 2, "cpu")
        v = g.fit(Net(8, 8))
        assert v.ok and v.waste > padded_stacks.MAX_WASTE and g.pads_cheaply(v) is cheap, (batch, v)


# ------------------------------------------------------------------------------------ real Tune

def _sweep(trainables, tmp_path, where, **kw):
    """Four trials of two hidden widths (HyperBand, with checkpoints): each trial's results and last checkpoint.

    A first sweep of one 32-wide trial leaves the host its stack, so that the trials of the second, which
    attach in whatever order their processes start, find the widest stack there (see SlotHost._stack_for)."""
    import tune_helpers as h
    from ray import tune
    from ray.tune.schedulers import HyperBandScheduler

    T = trainables(slots_per_host=4, run_ahead=2, idle_timeout_s=60.0, **kw)
    grid, _ = h.fit(T, {"lr": 0.05, "seed": 1, "hidden": 32}, tmp_path / where, name="first",
                    run_kw={"stop": {"training_iteration": 1}})
    assert h.errors(grid) == []
    lrs = [0.05, 0.02, 0.01, 0.003]
    space = {"lr": tune.grid_search(lrs), "seed": tune.sample_from(lambda c: int(c["lr"] * 10_000)),
             "hidden": tune.sample_from(lambda c: 24 if c["lr"] in (0.05, 0.01) else 32)}
    grid, log = h.fit(T, space, tmp_path / where,
                      scheduler=HyperBandScheduler(time_attr="training_iteration", max_t=4, reduction_factor=2),
                      run_kw={"stop": {"training_iteration": 4},
                              "checkpoint_config": tune.CheckpointConfig(checkpoint_frequency=1)})
    assert h.errors(grid) == []
    [stats] = T.host_stats()
    T.shutdown_hosts()
    out = {}
    for r in grid:
        rows = log.by_trial[r.metrics["trial_id"]]
        out[rows[0]["config"]["seed"]] = (rows, h.load_slot_state(h.trial_checkpoints(r.path)[-1]))
    return out, stats


def test_a_width_sweep_shares_one_padded_stack_and_trains_as_stacks_of_one_width(trainables, tmp_path):
    """Trials of hidden widths 24 and 32 (a padded FLOP cost of 1.33x for the narrow ones): one stack, every
    result and checkpoint equal to float rounding to a run that keeps each width in a stack of its own, through
    HyperBand's pauses and resumes; the checkpoints hold each model at its own width."""
    import tune_helpers as h

    apart, split = _sweep(trainables, tmp_path, "apart", stack_by=["hidden"])
    together, stats = _sweep(trainables, tmp_path, "together")
    assert len(split["stacks"]) == 2 and len(stats["stacks"]) == 1, (split["stacks"], stats["stacks"])
    assert split["padded_attaches"] == 0 and stats["padded_attaches"] >= 2  # both 24-wide trials, padded
    assert len({ck["signature"][0] for _, ck in together.values()}) == 2  # each checkpoint at its own width
    assert apart.keys() == together.keys() and len(apart) == 4
    for seed, (rows, ckpt) in together.items():
        ref_rows, ref_ckpt = apart[seed]
        ref = {(r["training_iteration"], r["iterations_since_restore"]): r for r in ref_rows}
        compared = 0
        for r in rows:
            other = ref.get((r["training_iteration"], r["iterations_since_restore"]))
            if other is None:  # HyperBand may pause a trial at another point in the other run
                continue
            compared += 1
            for k in ("train_loss", "val_loss", "val_acc", "grad_norm"):
                assert r[k] == pytest.approx(other[k], rel=1e-5, abs=1e-6), (seed, k)
        assert compared >= 1
        assert ckpt["signature"] == ref_ckpt["signature"]
        hidden = rows[0]["config"]["hidden"]
        model = h.make_model({"hidden": hidden})
        model.load_state_dict(ckpt["model"])  # the trial's own model, at its own width
        if ckpt["optimizer"]["steps"] == ref_ckpt["optimizer"]["steps"]:
            for k, v in ref_ckpt["model"].items():
                torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-4, atol=1e-5)


def _penalized(reduce):
    def step(model, batch, config):
        x, y = batch
        penalty = sum(reduce(p.pow(2)) for p in model.parameters())
        return F.cross_entropy(model(x), y) + 1e-2 * penalty

    return step


def test_a_user_step_is_checked_as_it_trains_the_stack():
    """A train_step that sums a penalty over the weights pads exactly (the zeros add nothing), and its slots
    train as in stacks of their own; one that averages over them would see the zeros, so its models get
    stacks of their own shapes."""
    def spec(reduce):
        return SlotSpec(model=lambda c: None, hparams=lambda c: {}, data=lambda: None, batch_size=16,
                        steps_per_report=K, train_step=_penalized(reduce), loss=None,
                        optimizer=OPTIMIZERS["adamw"], metrics={"acc": lambda o, y: (o.argmax(-1) == y).float().mean()})

    template = padded_stacks.pad_model(Net(32, 24), _shapes(Net(32, 24)))
    mean = SlotGroup(spec(torch.mean), "mean", template, _data(), 2, "cpu")
    verdict = mean.fit(Net(8, 16))
    assert verdict is not None and not verdict.ok and "differ" in verdict.reason
    summed = SlotGroup(spec(torch.sum), "sum", template, _data(), 2, "cpu")
    assert summed.fit(Net(8, 16)).ok
    summed.add("a", _build(lambda: Net(8, 16), 0), seed=1, hparams={"lr": 3e-3})
    own = _build(lambda: Net(8, 16), 0)
    alone = SlotGroup(spec(torch.sum), stack_key(own), own, _data(), 1, "cpu")
    alone.add("a", own, seed=1, hparams={"lr": 3e-3})
    _close_results(_train(summed, 2)[0], _train(alone, 2)[0])


def test_the_check_counts_flops_as_torch_does_without_importing_dynamo():
    """The padded check's FLOP count (its waste) is ``FlopCounterMode``'s, forward and backward, for
    convolutions, matmuls and attention, and counting imports no ``torch._dynamo`` (0.9 CPU-s per slot host)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, torch
        from torch import nn
        from ray_modelbatch import padded_stacks
        conv = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 14 * 14, 10))
        attn = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        counts = []
        for m, x in ((conv, torch.randn(4, 1, 32, 32)), (attn, torch.randn(3, 7, 16))):
            counts.append(padded_stacks._flops(lambda m: m(x).sum().backward(), m)[1])
        print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo", *counts)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["no", "dynamo"], out
    from torch.utils.flop_counter import FlopCounterMode

    conv = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 14 * 14, 10))
    attn = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    expected = []
    for m, x in ((conv, torch.randn(4, 1, 32, 32)), (attn, torch.randn(3, 7, 16))):
        with FlopCounterMode(display=False) as counter:
            m(x).sum().backward()
        expected.append(counter.get_total_flops())
    assert [int(v) for v in out[2:]] == expected and min(expected) > 0
