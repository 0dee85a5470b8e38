"""Mixed precision, per-slot loss scaling, non-finite isolation and readable fusion errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch.errors import FusionError

from conftest import MLP, clones, make_models


def _data(steps, s=None):
    g = torch.Generator().manual_seed(1)
    shape = (s, 16, 5) if s else (16, 5)
    return [(torch.randn(*shape, generator=g), torch.randn(*shape[:-1], 3, generator=g)) for _ in range(steps)]


def test_bf16_autocast_trains():
    mb = rmb.ModelBatch(make_models(4))
    opt = rmb.optim.Adam(mb, lr=0.01)
    eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss, autocast_dtype=torch.bfloat16)
    x, y = _data(1)[0]
    first = eng.train_step(x, y).losses
    for _ in range(30):
        last = eng.train_step(x, y)
    assert mb.params["0.weight"].dtype == torch.float32  # master weights stay fp32
    assert bool(last.updated.all()) and bool((last.losses < first).all())


class _LastStepLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(5, 6, batch_first=True), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.attn(x, x, x)[0].mean(1))


# (model, input shape, how close each slot stays to its model alone under torch.autocast, relative): Linear
# layers cast as torch's autocast casts them, so an MLP agreed to 9e-8 on the AMD EPYC of session 50 (a CPU with
# other bf16 GEMM kernels for bmm than for addmm may round an element one bf16 step apart: hence 1e-3, which
# still fails a fused step that skips autocast, 8e-3 off). The other kernels round their bf16 intermediates in
# other places than torch's (after 5 steps: BatchNorm up to 8e-5 with other data; LayerNorm 3e-3, the LSTM 1e-3,
# attention 8e-3), so those agree to bf16 rounding. torch is not the exact one: its CPU LayerNorm sums the weight
# and bias gradients of bf16 input to bf16 precision (3e-3 from the exact sums in a [16, 16] test), the fused
# LayerNorm in fp32.
_BF16_CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)), (16, 10), 1e-3),
    "cnn_bn": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Flatten(), nn.Linear(36, 3)), (8, 3, 9, 9), 1e-3),
    "layer_norm": (lambda: nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3)), (16, 10),
                   1e-2),
    "lstm": (_LastStepLSTM, (8, 7, 5), 1e-2),
    "attention": (_Attention, (8, 4, 8), 2e-2),
}


@pytest.mark.parametrize("case", sorted(_BF16_CASES))
def test_bf16_autocast_slots_train_as_their_models_under_autocast(case):
    make, shape, rtol = _BF16_CASES[case]
    torch.manual_seed(0)
    models = [make() for _ in range(3)]
    alone = clones(models)
    mb = rmb.ModelBatch(clones(models))
    eng = rmb.FusedEngine(mb, rmb.optim.SGD(mb, lr=0.1), F.cross_entropy, autocast_dtype=torch.bfloat16)
    refs = [torch.optim.SGD(m.parameters(), lr=0.1) for m in alone]
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        x, y = torch.randn(*shape, generator=g), torch.randint(0, 3, (shape[0],), generator=g)
        eng.train_step(x, y)
        for m, o in zip(alone, refs):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(x), y)
            loss.backward()
            o.step()
    for i, m in enumerate(alone):
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                err = float((mb.slot_state(i)[k] - v).abs().max() / v.abs().max().clamp_min(1e-12))
                assert err <= rtol, f"slot {i} {k}: {err:.1e} from its model alone under autocast"


def _fp16_run(scale_of_slot2):
    torch.manual_seed(0)
    models = make_models(4, d_in=5)
    mb = rmb.ModelBatch(models)
    opt = rmb.optim.SGD(mb, lr=0.05, momentum=0.9)
    scaler = rmb.SlotGradScaler(mb, init_scale=2.0**8, growth_interval=3)
    scaler.scales[2] = scale_of_slot2
    eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss, scaler=scaler, autocast_dtype=torch.float16)
    results = [eng.train_step(x, y) for x, y in _data(6)]
    return mb, opt, scaler, results


def test_fp16_overflow_skips_only_that_slot_and_backs_off_only_its_scale():
    huge = 2.0**40  # scaled fp16 gradients overflow in this slot only
    mb, opt, scaler, results = _fp16_run(huge)
    ref_mb, ref_opt, ref_scaler, _ = _fp16_run(2.0**8)
    assert results[0].nonfinite.tolist() == [False, False, True, False]
    assert results[0].updated.tolist() == [True, True, False, True]
    # slot 2 backs off each overflowing step until its scaled grads fit again; the others grow on schedule
    assert scaler.scales[2].item() < huge
    assert scaler.scales[[0, 1, 3]].tolist() == ref_scaler.scales[[0, 1, 3]].tolist()
    assert ref_scaler.scales[0].item() == 2.0**8 * 4  # grew twice in 6 clean steps (interval 3)
    for name, p in mb.params.items():
        assert torch.equal(p[[0, 1, 3]], ref_mb.params[name][[0, 1, 3]]), name
    assert opt.steps[2] < opt.steps[0] == 6


@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "AdamW"])
def test_nan_slot_is_isolated_and_reported(opt_name):
    """Slot 1's data turns NaN at step 3: it is skipped and reported; everyone else is bit-identical."""

    def run(poison):
        torch.manual_seed(0)
        models = make_models(4, bn=True)
        mb = rmb.ModelBatch(models)
        opt = getattr(rmb.optim, opt_name)(mb, lr=[0.01, 0.02, 0.03, 0.04], weight_decay=0.01, max_grad_norm=1.0)
        eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
        flagged = []
        for step, (x, y) in enumerate(_data(6, s=4)):
            if poison and step == 3:
                x = x.clone()
                x[1, 0, 0] = float("nan")
            r = eng.train_step(x, y, per_slot=True)
            flagged += [(step, int(s)) for s in r.slots[r.nonfinite]]
        return mb, opt, flagged

    bad, bad_opt, flagged = run(True)
    good, good_opt, clean = run(False)
    assert flagged == [(3, 1)] and clean == []
    for k in {**bad.params, **bad.buffers}:
        a, b = {**bad.params, **bad.buffers}[k], {**good.params, **good.buffers}[k]
        assert torch.equal(a[[0, 2, 3]], b[[0, 2, 3]]), k
        assert bool(torch.isfinite(a[1].float()).all()), k  # the bad slot itself stays usable
    assert bad_opt.steps.tolist() == [6.0, 5.0, 6.0, 6.0]


def test_diverging_slot_does_not_harm_others():
    """A slot whose lr makes it blow up to inf/NaN is frozen at its last finite weights."""

    def run(lr1):
        torch.manual_seed(0)
        mb = rmb.ModelBatch(make_models(3))
        opt = rmb.optim.SGD(mb, lr=[0.01, lr1, 0.02])
        eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
        return mb, [eng.train_step(x * 100, y) for x, y in _data(30)]

    mb, results = run(1e4)
    ref, _ = run(0.01)
    assert any(bool(r.nonfinite[1]) for r in results)
    assert not any(bool(r.nonfinite[[0, 2]].any()) for r in results)
    for name in mb.params:
        assert torch.equal(mb.params[name][[0, 2]], ref.params[name][[0, 2]])
        assert bool(torch.isfinite(mb.params[name][1]).all())


class UsesItem(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), Gate())

    def forward(self, x):
        return self.body(x)


class Gate(nn.Module):
    def forward(self, x):
        return x * x.sum().item()


class Branches(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:
            return h
        return -h


class DynamicShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.nonzero(self.lin(x))


@pytest.mark.parametrize(
    "cls,match",
    [
        (UsesItem, r"module 'body.1' \(Gate\).*\.item\(\).*Fix:"),
        (Branches, r"model's own forward \(Branches\).*control flow.*torch.where"),
        (DynamicShape, r"forward \(DynamicShape\).*depends on the data.*Fix:"),
    ],
)
def test_unfusable_models_fail_with_named_module_and_fix(cls, match):
    mb = rmb.ModelBatch([cls() for _ in range(2)])
    with pytest.raises(FusionError, match=match):
        mb(torch.randn(3, 4))


def test_wrong_input_shape_is_a_clear_error():
    mb = rmb.ModelBatch(make_models(2))
    with pytest.raises(rmb.InputShapeError, match=r"Module '0' \(Linear\) failed on its input: .*One model's input: "
                                                  r"\(3, 7\)\. Fix: pass a batch shaped as one model expects"):
        mb(torch.randn(3, 7))
    with pytest.raises(ValueError, match="leading dimension 3.*2 slots"):
        mb(torch.randn(3, 4, 5), per_slot=True)


def test_a_layer_that_does_not_fit_the_one_before_it_blames_the_model_not_the_batch():
    """A width written as a number (Linear(32, ...) after a layer of 16 outputs): the batch is right, so
    the line names the layers before the failing one and the model's sizes, not the batch's shape."""
    mb = rmb.ModelBatch([nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(32, 3)) for _ in range(2)])
    with pytest.raises(rmb.InputShapeError, match=r"Module '2' \(Linear\) failed on the output of the layers "
                                                  r"before it \('1' last\): .*Fix: make the model's layers fit "
                                                  r"each other") as err:
        mb(torch.randn(3, 4))
    assert "pass a batch shaped" not in str(err.value) and err.value.about == "layers"


def test_a_bug_in_the_users_step_outside_the_model_is_not_blamed_on_fusion():
    """topk(k) with k over the number of classes in an eval/train step: torch's error, under vmap, outside
    every layer. The line says it is most likely the step's own bug (run it alone), not vmap advice first."""
    mb = rmb.ModelBatch(make_models(2, d_out=5))

    def step(model, batch, config):
        x, y = batch
        out = model(x)
        return F.cross_entropy(out, y) + out.topk(20, dim=-1).values.sum() * 0

    eng = rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=1e-2), step_fn=step)
    x, y = _batch()
    with pytest.raises(FusionError, match=r"The step function 'step' raised RuntimeError outside the model's "
                                          r"layers, run under torch.vmap .*selected index k out of range.*Most "
                                          r"often this is a bug in that function"):
        eng.train_step(x, y)


class Renorm(nn.Module):
    def forward(self, x):
        return torch.renorm(x, 2, 0, 1.0)


class SlowOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), Renorm())

    def forward(self, x):
        return self.body(x)


def test_op_without_batching_rule_warns_with_module_and_still_works():
    models = [SlowOp() for _ in range(2)]
    mb = rmb.ModelBatch(models)
    x = torch.randn(3, 4)
    with pytest.warns(rmb.FusionWarning, match=r"module 'body.1' \(Renorm\) uses aten::renorm, which has no vmap"):
        out = mb(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x))


def _engine(loss=F.cross_entropy, n=3):
    mb = rmb.ModelBatch(make_models(n, d_out=5))
    return rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=1e-2), loss)


def _batch(rows=8, d_in=5, classes=5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, d_in, generator=g), torch.randint(0, classes, (rows,), generator=g)


def test_a_loss_that_gives_more_than_one_number_per_model_says_so_in_one_line():
    x, y = _batch()
    for loss in (lambda out, y: F.cross_entropy(out, y, reduction="none"), nn.CrossEntropyLoss(reduction="none")):
        eng = _engine(loss)
        before = {k: v.clone() for k, v in eng.mb.params.items()}
        with pytest.raises(TypeError, match=r"returned a tensor of shape \[8\] for one model; it must return one "
                                            r"number .* Fix: reduce it"):
            eng.train_step(x, y)
        assert all(torch.equal(before[k], v) for k, v in eng.mb.params.items())  # nothing moved


def test_inputs_and_labels_that_do_not_fit_the_models_are_explained_and_training_goes_on(recwarn):
    """The hand-written MLP step (mlp_step) and the direct path hand a failure to vmap's path, which names
    the problem: the input's width, labels out of range or of a float dtype. No "please report" warning for a
    mistake in the data, and the stack trains on its own fast path once the data is right."""
    eng = _engine()
    x, y = _batch()
    with pytest.raises(rmb.InputShapeError, match=r"Module '0' \(Linear\) failed on its input: .*One model's "
                                                  r"input: \(8, 7\)"):
        eng.train_step(torch.randn(8, 7), y)
    with pytest.raises(rmb.InputShapeError, match=r"The loss 'cross_entropy' failed on one model's output and its "
                                                  r"labels: .* output has shape \[8, 5\]; its labels: shape \[8\], "
                                                  r"dtype torch.int64, values 6 to 9\. Fix: give labels that fit"):
        eng.train_step(x, y + 5)
    with pytest.raises(rmb.InputShapeError, match=r"its labels: shape \[8\], dtype torch.float32\. Fix"):
        eng.train_step(x, y.float())
    assert not [w for w in recwarn if issubclass(w.category, rmb.FusionWarning)]
    assert eng.train_step(x, y).updated.all()
    assert eng.mb.uses_direct_path and not eng.mb._slow_keys
