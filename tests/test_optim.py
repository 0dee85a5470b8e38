"""Vectorized optimizers: each slot trains exactly like its model alone with torch.optim."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import ray_modelbatch as rmb
from ray_modelbatch import fast_path
from ray_modelbatch.errors import HyperparameterError
from ray_modelbatch.optim import schedules

from conftest import clones, make_models, max_rel_diff

S = 4
STEPS = 20


def run_pair(make_fused, make_ref, make_sched=None, clip=None, steps=STEPS, hook=None, d_in=5, hidden=8, **mb_kw):
    """Train S fused slots and S reference models on identical batches; return (mb, refs, opt)."""
    models = make_models(S, d_in=d_in, hidden=hidden)
    refs = clones(models)
    mb = rmb.ModelBatch(models, **mb_kw)
    opt = make_fused(mb)
    ropts = [make_ref(r.parameters(), i) for i, r in enumerate(refs)]
    scheds = [make_sched(o, i) for i, o in enumerate(ropts)] if make_sched else []
    eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
    for step in range(steps):
        if hook:
            hook(step, opt, ropts)
        x, y = torch.randn(16, d_in), torch.randn(16, 3)
        eng.train_step(x, y)
        for r, o in zip(refs, ropts):
            o.zero_grad()
            nn.functional.mse_loss(r(x), y).backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(r.parameters(), clip[refs.index(r)])
            o.step()
        for s in scheds:
            s.step()
    return mb, refs, opt


LR = [0.05, 0.01, 0.002, 0.03]


def test_sgd_matches_torch_with_distinct_per_slot_hparams():
    mom, damp, nest, wd = [0.0, 0.9, 0.5, 0.9], [0.0, 0.1, 0.0, 0.0], [False, False, True, True], [0.0, 1e-2, 0.0, 1e-3]
    mb, refs, _ = run_pair(
        lambda mb: rmb.optim.SGD(mb, lr=LR, momentum=mom, dampening=damp, nesterov=nest, weight_decay=wd),
        lambda p, i: torch.optim.SGD(p, lr=LR[i], momentum=mom[i], dampening=damp[i], nesterov=nest[i], weight_decay=wd[i]),
    )
    assert max_rel_diff(mb, refs) < 1e-5


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_adam_family_matches_torch_with_distinct_per_slot_hparams(cls):
    betas = [(0.9, 0.999), (0.8, 0.99), (0.95, 0.9), (0.5, 0.6)]
    eps, wd, ams = [1e-8, 1e-6, 1e-7, 1e-8], [0.0, 0.1, 0.01, 0.2], [False, True, False, True]
    mb, refs, _ = run_pair(
        lambda mb: getattr(rmb.optim, cls)(mb, lr=LR, betas=betas, eps=eps, weight_decay=wd, amsgrad=ams),
        lambda p, i: getattr(torch.optim, cls)(p, lr=LR[i], betas=betas[i], eps=eps[i], weight_decay=wd[i], amsgrad=ams[i]),
    )
    assert max_rel_diff(mb, refs) < 1e-5


def single_pass_calls(monkeypatch) -> list:
    """The ``[n, P]`` buffers each optimizer step hands to torch's single-pass kernel, recorded from now on."""
    from ray_modelbatch.optim import base

    calls = []
    real = base.VectorOptimizer._apply_single_pass
    monkeypatch.setattr(base.VectorOptimizer, "_apply_single_pass",
                        lambda self, p, *a: (calls.append(p.shape), real(self, p, *a))[1])
    return calls


SINGLE_PASS_CASES = {
    "Adam": dict(betas=[(0.9, 0.999), (0.8, 0.99), (0.95, 0.9), (0.5, 0.6)], eps=[1e-8, 1e-6, 1e-7, 1e-8],
                 weight_decay=[0.0, 0.1, 0.01, 0.2], amsgrad=[False, True, False, True]),
    "AdamW": dict(betas=[(0.9, 0.999), (0.8, 0.99), (0.95, 0.9), (0.5, 0.6)], weight_decay=[0.0, 0.1, 0.01, 0.2],
                  amsgrad=[True, False, False, True]),
    "SGD": dict(momentum=[0.9, 0.5, 0.99, 0.9], dampening=[0.0, 0.1, 0.0, 0.0], nesterov=[True, False, False, True],
                weight_decay=[0.0, 1e-2, 0.0, 1e-3]),
}


@pytest.mark.parametrize("cls", list(SINGLE_PASS_CASES))
def test_large_slots_update_through_torchs_single_pass_kernel_and_match_torch(cls, monkeypatch):
    """Slots of at least SINGLE_PASS_MIN_ELEMENTS parameters update on CPU through torch's fused kernel, one
    call per slot with its own values (amsgrad, decay, momentum, clipping, a schedule): still torch.optim."""
    from ray_modelbatch.optim import base

    calls = single_pass_calls(monkeypatch)
    kw, clip = SINGLE_PASS_CASES[cls], [0.5, 1.0, math.inf, 0.1]
    mb, refs, _ = run_pair(
        lambda mb: getattr(rmb.optim, cls)(mb, lr=LR, max_grad_norm=clip, schedule=schedules.warmup_cosine(STEPS, 5),
                                           **kw),
        lambda p, i: getattr(torch.optim, cls)(p, lr=LR[i], **{k: v[i] for k, v in kw.items()}),
        make_sched=lambda o, i: torch.optim.lr_scheduler.LambdaLR(o, _cosine_lambda(5, STEPS, 0.0)),
        clip=clip, d_in=120, hidden=160,
    )
    assert calls and all(shape[1] >= base.SINGLE_PASS_MIN_ELEMENTS for shape in calls)
    assert max_rel_diff(mb, refs) < 1e-5


def test_sgd_with_and_without_momentum_in_one_stack_keeps_the_tiled_update(monkeypatch):
    """torch's SGD kernel keeps no buffer for a zero momentum, ours does once any slot has momentum: such a
    stack keeps the tiled update (and still matches torch.optim.SGD)."""
    calls = single_pass_calls(monkeypatch)
    mom = [0.9, 0.0, 0.5, 0.0]
    mb, refs, opt = run_pair(lambda mb: rmb.optim.SGD(mb, lr=LR, momentum=mom),
                           lambda p, i: torch.optim.SGD(p, lr=LR[i], momentum=mom[i]), d_in=120, hidden=160)
    assert not calls
    assert max_rel_diff(mb, refs) < 1e-5
    mb.zero_grad()  # a step of only the zero-momentum slots still keeps the tiled update (their buffers)
    losses, _ = mb.forward_loss(torch.randn(16, 120), torch.randn(16, 3), nn.functional.mse_loss)
    losses.sum().backward()
    opt.step(slots=[1, 3])
    assert not calls


def test_single_pass_kernel_skips_and_steps_subsets_like_the_tiled_update(monkeypatch):
    """A NaN slot is skipped (its weights, state and step count untouched; its gradient zeroed), and a step
    of some slots leaves the others alone, exactly as the tiled update does it."""
    from ray_modelbatch.optim import base

    def run(min_elements):
        monkeypatch.setattr(base, "SINGLE_PASS_MIN_ELEMENTS", min_elements)
        torch.manual_seed(0)
        mb = rmb.ModelBatch(make_models(S, d_in=120, hidden=160))
        opt = rmb.optim.AdamW(mb, lr=LR, amsgrad=[True, False, False, True], max_grad_norm=[0.05, 0.02, 1e3, 0.1])
        g = torch.Generator().manual_seed(1)
        for step in range(5):
            mb.zero_grad()
            loss, _ = mb.forward_loss(torch.randn(16, 120, generator=g), torch.randn(16, 3, generator=g),
                                      nn.functional.mse_loss)
            loss.sum().backward()
            if step == 2:
                mb.params["0.weight"].grad[1, 0, 0] = float("nan")
            opt.step(slots=[0, 1, 3] if step == 3 else "active")
            if step == 2:  # the skipped slot's gradient is zeroed, the others' are clipped in place
                grads = {k: v.grad.clone() for k, v in mb.params.items()}
        return {k: v.detach().clone() for k, v in mb.params.items()}, opt.state_dict(), opt.steps.tolist(), grads

    threshold = base.SINGLE_PASS_MIN_ELEMENTS
    calls = single_pass_calls(monkeypatch)
    tiled = run(1 << 40)
    assert not calls
    single = run(threshold)
    assert calls
    assert tiled[2] == single[2] == [5.0, 4.0, 4.0, 5.0]  # slot 1 skipped once (NaN), slot 2 left out once
    for k in tiled[0]:
        torch.testing.assert_close(single[0][k], tiled[0][k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(single[3][k], tiled[3][k], rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("cls", ["SGD", "Adam"])
def test_onednn_gemms_match_torch(cls):
    """``cpu_gemm="onednn"`` runs layers of at least DIRECT_WRITE_MIN weights through oneDNN (the 120x160
    layer here, not the 160x3 one); its input is the batch every slot shares, so its forward is one GEMM
    against all slots' weights and so is its weight gradient. The slots still train like torch."""
    assert fast_path.onednn_available()  # torch's CPU wheels ship it: a build without it should fail here
    kw = dict(momentum=0.9) if cls == "SGD" else dict(betas=(0.8, 0.99))
    calls = []
    real = fast_path._onednn_linear

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fast_path, "_onednn_linear", counted)
        mb, refs, _ = run_pair(
            lambda mb: getattr(rmb.optim, cls)(mb, lr=LR, **kw),
            lambda p, i: getattr(torch.optim, cls)(p, lr=LR[i], **kw),
            d_in=120, hidden=160, cpu_gemm="onednn",
        )
    # per step: the forward [B, 120] against [S*160, 120], and the weight gradient [S*160, B] against [120, B]
    assert len(calls) == STEPS * 2 and set(calls) == {torch.Size([16, 120]), torch.Size([S * 160, 16])}
    assert max_rel_diff(mb, refs) < 1e-5
    # one GEMM over all slots: a gather of some of them is not promised to round alike (ModelBatch.gather_exact)
    assert mb.uses_direct_path and not mb.gather_exact
    assert rmb.ModelBatch(list(refs)).gather_exact


def _cosine_lambda(warmup, total, ratio):
    """HF's get_cosine_with_min_lr_schedule_with_warmup lambda (held at the minimum after total)."""
    def f(t):
        if t < warmup:
            return t / max(1, warmup)
        progress = min(max((t - warmup) / max(1, total - warmup), 0.0), 1.0)
        return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


@pytest.mark.parametrize("compiled", [False, True])
def test_per_slot_schedules_match_torch_lr_schedulers(compiled):
    kinds = [
        schedules.constant(),
        schedules.step_decay(step_size=4, gamma=0.5),
        schedules.warmup_cosine(total_steps=15, warmup_steps=5, min_lr_ratio=0.1),
        schedules.warmup_cosine(total_steps=24, warmup_steps=0, min_lr_ratio=0.2),  # torch restarts after T_max
    ]
    lam = _cosine_lambda(5, 15, 0.1)

    def ref_sched(o, i):
        L = torch.optim.lr_scheduler
        return [lambda: L.ConstantLR(o, factor=1.0, total_iters=0), lambda: L.StepLR(o, step_size=4, gamma=0.5),
                lambda: L.LambdaLR(o, lam), lambda: L.CosineAnnealingLR(o, T_max=24, eta_min=0.2 * LR[3])][i]()

    mb, refs, opt = run_pair(
        lambda mb: rmb.optim.Adam(mb, lr=LR, schedule=kinds, compile=compiled),
        lambda p, i: torch.optim.Adam(p, lr=LR[i]),
        make_sched=ref_sched,
    )
    assert max_rel_diff(mb, refs) < 1e-5
    assert (opt._compiled is not None) == compiled, "torch.compile fell back to eager"
    assert opt.current_lr()[1].item() == pytest.approx(LR[1] * 0.5**5)


def test_schedule_parameters_per_slot_in_one_schedule():
    warm = [0, 2, 4, 6]
    mb, refs, _ = run_pair(
        lambda mb: rmb.optim.SGD(mb, lr=LR, momentum=0.9,
                                 schedule=schedules.warmup_cosine(total_steps=18, warmup_steps=warm)),
        lambda p, i: torch.optim.SGD(p, lr=LR[i], momentum=0.9),
        make_sched=lambda o, i: torch.optim.lr_scheduler.LambdaLR(o, _cosine_lambda(warm[i], 18, 0.0)),
    )
    assert max_rel_diff(mb, refs) < 1e-5


def test_per_slot_gradient_clipping_matches_clip_grad_norm():
    clip = [0.05, 0.5, math.inf, 0.01]
    mb, refs, opt = run_pair(
        lambda mb: rmb.optim.SGD(mb, lr=LR, momentum=0.5, max_grad_norm=clip),
        lambda p, i: torch.optim.SGD(p, lr=LR[i], momentum=0.5),
        clip=clip,
    )
    assert max_rel_diff(mb, refs) < 1e-5
    assert opt.last_grad_norm.shape == (S,)


def test_changing_one_slots_hyperparameters_at_run_time():
    def hook(step, opt, ropts):
        if step == 10:
            opt.set_hparams(2, lr=0.2, betas=(0.5, 0.9))
            ropts[2].param_groups[0].update(lr=0.2, betas=(0.5, 0.9))

    mb, refs, opt = run_pair(lambda mb: rmb.optim.Adam(mb, lr=LR), lambda p, i: torch.optim.Adam(p, lr=LR[i]), hook=hook)
    assert max_rel_diff(mb, refs) < 1e-5
    assert opt.get_hparams(2)["betas"] == pytest.approx((0.5, 0.9))
    assert opt.get_hparams(1)["lr"] == pytest.approx(LR[1])


def test_slot_state_export_import_continues_exactly():
    """Export slot 1 mid-training, import into slot 0 of another batch: both continue identically."""
    models = make_models(3)
    mb = rmb.ModelBatch(models)
    opt = rmb.optim.AdamW(mb, lr=[0.01, 0.03, 0.02], schedule=schedules.step_decay(3, 0.5))
    eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
    data = [(torch.randn(16, 5), torch.randn(16, 3)) for _ in range(10)]
    for x, y in data[:5]:
        eng.train_step(x, y)
    model_state, opt_state = mb.slot_state(1), opt.slot_state(1)

    other = rmb.ModelBatch(make_models(2))
    other_opt = rmb.optim.AdamW(other, lr=0.5)
    other.load_slot(0, model_state)
    other_opt.load_slot_state(0, opt_state)
    other.deactivate(1)
    other_eng = rmb.FusedEngine(other, other_opt, nn.functional.mse_loss)
    for x, y in data[5:]:
        eng.train_step(x, y)
        other_eng.train_step(x, y)
    for k, v in mb.slot_state(1).items():
        torch.testing.assert_close(other.slot_state(0)[k], v, rtol=1e-6, atol=0)
    assert other_opt.get_hparams(0)["lr"] == pytest.approx(0.03)

    with pytest.raises(HyperparameterError, match="does not fit"):
        wide = rmb.ModelBatch(make_models(1, hidden=16))
        rmb.optim.AdamW(wide).load_slot_state(0, opt_state)


def test_invalid_hyperparameters_name_slot_and_fix():
    mb = rmb.ModelBatch(make_models(3))
    with pytest.raises(HyperparameterError, match=r"invalid lr for slot\(s\) \[1\]"):
        rmb.optim.Adam(mb, lr=[0.1, -1.0, 0.1])
    with pytest.raises(HyperparameterError, match="3 slots"):
        rmb.optim.SGD(mb, lr=[0.1, 0.2])
    with pytest.raises(HyperparameterError, match="beta2"):
        rmb.optim.Adam(mb, betas=[(0.9, 0.99), (0.9, 1.5), (0.9, 0.99)])
    with pytest.raises(HyperparameterError, match="nesterov"):
        rmb.optim.SGD(mb, lr=0.1, momentum=[0.9, 0.0, 0.9], nesterov=True)
    with pytest.raises(HyperparameterError, match="no hyperparameter 'momentum'"):
        rmb.optim.Adam(mb, momentum=0.9)
    opt = rmb.optim.Adam(mb, lr=0.1)
    with pytest.raises(HyperparameterError, match="eps"):
        opt.set_hparams(2, eps=-1.0)
    assert opt.get_hparams(2)["eps"] == pytest.approx(1e-8)  # a rejected change leaves the old value
    # a rule between columns reads the ones not being set too: slot 1 has no momentum for nesterov
    sgd = rmb.optim.SGD(mb, lr=0.1, momentum=[0.9, 0.0, 0.9])
    with pytest.raises(HyperparameterError, match=r"nesterov momentum for slot\(s\) \[1\]"):
        sgd.set_hparams(1, nesterov=True)
    assert sgd.get_hparams(1)["nesterov"] is False
    sgd.set_hparams([0, 2], nesterov=True)
    assert [sgd.get_hparams(i)["nesterov"] for i in range(3)] == [True, False, True]


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("cls,kw", [("SGD", dict(momentum=0.9, nesterov=[True, False] * 32)),
                                    ("Adam", dict(amsgrad=[True, False] * 32)),
                                    ("AdamW", dict(max_grad_norm=1.0, schedule=schedules.warmup_cosine(100, 10)))])
def test_optimizer_kernel_count_does_not_grow_with_slots(cls, kw):
    counts = []
    for s in (2, 64):
        mb = rmb.ModelBatch(make_models(s))
        kwargs = {k: (v[:s] if isinstance(v, list) else v) for k, v in kw.items()}
        opt = getattr(rmb.optim, cls)(mb, lr=[0.01] * s, **kwargs)
        losses, _ = mb.forward_loss(torch.randn(4, 5), torch.randn(4, 3), nn.functional.mse_loss)
        losses.sum().backward()
        with CountOps() as c:
            opt.step()
        counts.append(c.count)
    assert counts[0] == counts[1]


@pytest.mark.parametrize("tile", [7, 150, 1 << 30])  # column tiles (P=75), row tiles, one tile
def test_cache_tiling_on_cpu_gives_identical_updates(tile, monkeypatch):
    from ray_modelbatch.optim import base

    def run(tile_elements):
        monkeypatch.setattr(base, "CPU_TILE_ELEMENTS", tile_elements)
        torch.manual_seed(0)
        mb = rmb.ModelBatch(make_models(S))
        opt = rmb.optim.AdamW(mb, lr=LR, amsgrad=[True, False] * 2, max_grad_norm=[0.1, 1.0, math.inf, 0.5])
        eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
        mb.deactivate(1)
        g = torch.Generator().manual_seed(3)
        for _ in range(5):
            eng.train_step(torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g))
        return {k: v.detach().clone() for k, v in mb.params.items()}, opt.state

    ref, ref_state = run(1 << 30)
    got, got_state = run(tile)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    for k in ref_state[torch.float32]:
        assert torch.equal(ref_state[torch.float32][k], got_state[torch.float32][k]), k


def test_compiled_update_matches_torch_and_skips_like_eager():
    """``compile=True`` fuses the update into one pass; each slot still matches torch.optim, and a
    NaN slot is skipped exactly as in the eager update (the others unchanged by it)."""
    betas, ams, wd = [(0.9, 0.999), (0.8, 0.99), (0.95, 0.9), (0.5, 0.6)], [False, True, False, True], [0.0, 0.1, 0.01, 0.2]
    mb, refs, opt = run_pair(
        lambda mb: rmb.optim.AdamW(mb, lr=LR, betas=betas, weight_decay=wd, amsgrad=ams, compile=True),
        lambda p, i: torch.optim.AdamW(p, lr=LR[i], betas=betas[i], weight_decay=wd[i], amsgrad=ams[i]),
    )
    assert opt._compiled is not None, "torch.compile fell back to eager on this machine"
    assert max_rel_diff(mb, refs) < 1e-5
    mom, nest = [0.0, 0.9, 0.5, 0.9], [False, False, True, True]
    mb, refs, _ = run_pair(
        lambda mb: rmb.optim.SGD(mb, lr=LR, momentum=mom, nesterov=nest, max_grad_norm=[0.5, 1.0, math.inf, 0.1],
                                 compile=True),
        lambda p, i: torch.optim.SGD(p, lr=LR[i], momentum=mom[i], nesterov=nest[i]),
        clip=[0.5, 1.0, math.inf, 0.1],
    )
    assert max_rel_diff(mb, refs) < 1e-5

    def run(compiled):
        torch.manual_seed(0)
        mb = rmb.ModelBatch(make_models(S))
        opt = rmb.optim.Adam(mb, lr=LR, compile=compiled)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            mb.zero_grad()
            loss, _ = mb.forward_loss(torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g),
                                      nn.functional.mse_loss)
            loss.sum().backward()
            if step == 2:
                mb.params["0.weight"].grad[1, 0, 0] = float("nan")
            opt.step()
        return {k: v.detach().clone() for k, v in mb.params.items()}, opt.steps.clone()

    (eager, eager_steps), (comp, comp_steps) = run(False), run(True)
    assert eager_steps.tolist() == comp_steps.tolist() == [4, 3, 4, 4]
    for k in eager:
        assert torch.allclose(eager[k], comp[k], rtol=1e-6, atol=1e-7), k


def test_compiled_step_on_a_changing_subset_of_slots_matches_eager():
    """With compile=True the whole step (norms, coefficients, update) is one compiled call; a subset
    of slots (another shape, gathered rows) and a skipped slot give what the eager step gives."""
    def run(compiled):
        torch.manual_seed(0)
        mb = rmb.ModelBatch(make_models(S))
        opt = rmb.optim.SGD(mb, lr=LR, momentum=0.9, max_grad_norm=[0.5, 1.0, math.inf, 0.1], compile=compiled)
        eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
        g = torch.Generator().manual_seed(1)
        for step in range(6):
            if step == 2:
                mb.deactivate(1)
            if step == 4:
                mb.deactivate(3)
            x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
            if step == 5:
                x[0, 0] = float("nan")  # every slot's loss is NaN: all skip, none changes
            eng.train_step(x, y)
        return {k: v.detach().clone() for k, v in mb.params.items()}, opt.steps.tolist(), opt._compiled

    (eager, eager_steps, _), (comp, comp_steps, fn) = run(False), run(True)
    assert fn is not None, "torch.compile fell back to eager"
    assert eager_steps == comp_steps == [5.0, 2.0, 5.0, 4.0]
    for k in eager:
        torch.testing.assert_close(comp[k], eager[k], rtol=1e-6, atol=1e-7)


def test_compiler_failure_warns_and_runs_the_step_eagerly():
    """If torch.compile cannot build the step (no C++ compiler, an unsupported op), the step runs
    eagerly with a warning, gives the eager result, and later steps stay eager."""
    import torch._dynamo.exc

    def run(break_compiler):
        torch.manual_seed(0)
        mb = rmb.ModelBatch(make_models(S))
        opt = rmb.optim.Adam(mb, lr=LR, compile=break_compiler)
        if break_compiler:
            def fails(*args):
                raise torch._dynamo.exc.Unsupported("no C++ compiler")
            opt._compiled = fails
        eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            eng.train_step(torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g))
        return {k: v.detach().clone() for k, v in mb.params.items()}, opt

    with pytest.warns(RuntimeWarning, match="running the optimizer update eagerly"):
        got, opt = run(True)
    assert opt._compiled is None
    want, _ = run(False)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_compiled_step_under_a_dispatch_mode_runs_eagerly_and_stays_compiled():
    """torch.compile cannot trace under a TorchDispatchMode (torch's FlopCounterMode, an op logger): a
    compiled optimizer steps eagerly while one is active, with the eager result, and compiled again after."""
    from torch.utils.flop_counter import FlopCounterMode

    def run(compiled, counted_steps=()):
        torch.manual_seed(0)
        mb = rmb.ModelBatch(make_models(S))
        opt = rmb.optim.Adam(mb, lr=LR, compile=compiled)
        eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            x, y = torch.randn(16, 5, generator=g), torch.randn(16, 3, generator=g)
            if step in counted_steps:
                with FlopCounterMode(display=False) as counter:
                    eng.train_step(x, y)
                assert counter.get_total_flops() > 0
            else:
                eng.train_step(x, y)
        return {k: v.detach().clone() for k, v in mb.params.items()}, opt

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "running the optimizer update eagerly" fallback
        got, opt = run(True, counted_steps=(0, 2))
    assert opt._compiled is not None, "a dispatch mode switched compile off for good"
    want, _ = run(False)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_betas_as_two_per_slot_tensors():
    """``betas=(beta1s, beta2s)`` with one value per slot in each tensor, as the README shows."""
    mb = rmb.ModelBatch([nn.Linear(3, 2) for _ in range(4)])
    b1, b2 = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0.99, 0.98, 0.97, 0.96])
    opt = rmb.optim.Adam(mb, betas=(b1, b2))
    assert [opt.get_hparams(i)["betas"] for i in range(4)] == [
        pytest.approx((float(a), float(b))) for a, b in zip(b1, b2)]
    with pytest.raises(rmb.errors.HyperparameterError, match="two tensors of 4 values"):
        rmb.optim.Adam(mb, betas=(torch.ones(3) * 0.9, torch.ones(3) * 0.99))


@pytest.mark.parametrize("d_in", [5, 120])  # the tiled update, torch's single-pass kernel
@pytest.mark.parametrize("cls,kw", [("Adam", dict(weight_decay=0.01)), ("SGD", dict(momentum=0.9))])
def test_float64_stacks_train_like_torch(cls, kw, d_in):
    """A float64 stack (its gradient norms were asked for in fp32 and failed) matches torch.optim in fp64."""
    torch.manual_seed(0)
    models = [m.double() for m in make_models(S, d_in=d_in, hidden=160)]
    refs = clones(models)
    mb = rmb.ModelBatch(models)
    clip = [0.5, 1e9, 0.1, 1.0]
    eng = rmb.FusedEngine(mb, getattr(rmb.optim, cls)(mb, lr=LR, max_grad_norm=clip, **kw), nn.functional.mse_loss)
    ropts = [getattr(torch.optim, cls)(r.parameters(), lr=LR[i], **kw) for i, r in enumerate(refs)]
    for _ in range(10):
        x, y = torch.randn(16, d_in, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
        eng.train_step(x, y)
        for r, o, c in zip(refs, ropts, clip):
            o.zero_grad()
            nn.functional.mse_loss(r(x), y).backward()
            torch.nn.utils.clip_grad_norm_(r.parameters(), c)
            o.step()
    assert max_rel_diff(mb, refs) < 1e-12
