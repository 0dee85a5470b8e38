"""ModelBatch: stacking, forward, gradients, slot operations, masking, resizing, dropout, BatchNorm."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ray_modelbatch as rmb
from ray_modelbatch.errors import IncompatibleModelsError

from conftest import MLP, clones, make_models


def test_forward_matches_each_model_shared_and_per_slot():
    models = make_models(4)
    mb = rmb.ModelBatch(models)
    assert mb.num_slots == 4
    x = torch.randn(7, 5)
    out = mb(x)
    assert out.shape == (4, 7, 3)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x), rtol=1e-6, atol=1e-6)
    xs = torch.randn(4, 7, 5)
    out = mb(xs, per_slot=True)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(xs[i]), rtol=1e-6, atol=1e-6)


class TakesExtra(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, shift, scale=1.0):
        return self.lin(x) * scale + shift


def test_extra_args_and_kwargs_pass_through():
    models = [TakesExtra() for _ in range(3)]
    mb = rmb.ModelBatch(models)
    x, shift = torch.randn(4, 3), torch.randn(2)
    out = mb(x, shift, scale=2.0)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x, shift, scale=2.0))


def test_params_are_leaves_and_sum_of_losses_gives_each_slot_its_gradient():
    models = make_models(3)
    mb = rmb.ModelBatch(models)
    for p in mb.parameters():
        assert p.is_leaf and p.requires_grad and p.shape[0] == 3
    x, y = torch.randn(6, 5), torch.randn(6, 3)
    losses, _ = mb.forward_loss(x, y, nn.functional.mse_loss)
    losses.sum().backward()
    for i, m in enumerate(models):
        nn.functional.mse_loss(m(x), y).backward()
        for name, p in m.named_parameters():
            torch.testing.assert_close(mb.params[name].grad[i], p.grad, rtol=1e-5, atol=1e-7)


def test_incompatible_models_name_the_mismatch():
    with pytest.raises(IncompatibleModelsError, match=r"slot 2 .*'2.weight'.*\[3, 8\].*\[4, 8\]"):
        rmb.ModelBatch([MLP(), MLP(), MLP(d_out=4)])
    with pytest.raises(IncompatibleModelsError, match="float64"):
        rmb.ModelBatch([MLP(), MLP().double()])
    with pytest.raises(IncompatibleModelsError, match="same class"):
        rmb.ModelBatch([MLP(), nn.Linear(5, 3)])
    with pytest.raises(IncompatibleModelsError, match="empty"):
        rmb.ModelBatch([])


def test_a_lazy_module_not_yet_run_is_named_in_one_line():
    def lazy():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(3))

    with pytest.raises(IncompatibleModelsError, match=r"model 0's module '2' \(LazyLinear\) has uninitialized "
                                                      r"parameters \(weight, bias\).*run each model once"):
        rmb.ModelBatch([lazy() for _ in range(2)])
    models = [lazy() for _ in range(2)]
    for m in models:
        m(torch.randn(1, 3, 6, 6))  # initialized by a forward, it stacks
    assert rmb.ModelBatch(models).num_slots == 2


def test_models_that_are_not_a_list_of_modules_are_named_in_one_line():
    with pytest.raises(TypeError, match=r"a list of models, one per slot; got one MLP\. Fix: ModelBatch\(\[model\]\)"):
        rmb.ModelBatch(MLP())
    with pytest.raises(TypeError, match="model 1 is None"):
        rmb.ModelBatch([MLP(), None])
    with pytest.raises(TypeError, match="model 0 is str"):
        rmb.ModelBatch(["MLP"])


def test_slot_state_loads_into_fresh_module():
    models = make_models(3, bn=True)
    mb = rmb.ModelBatch(models)
    mb(torch.randn(8, 5))  # train-mode forward updates BN stats
    fresh = MLP(bn=True)
    fresh.load_state_dict(mb.slot_state(1))
    mb.eval()
    fresh.eval()
    x = torch.randn(4, 5)
    torch.testing.assert_close(mb(x)[1], fresh(x))


def _snapshot(mb, opt=None):
    snap = {k: v.detach().clone() for k, v in {**mb.params, **mb.buffers}.items()}
    if opt is not None:
        for dt, st in opt.state.items():
            snap.update({f"opt.{dt}.{k}": v.clone() for k, v in st.items()})
        snap["opt.steps"] = opt.steps.clone()
    return snap


def _rows_equal(a, b, rows):
    for k in a:
        assert torch.equal(a[k][rows], b[k][rows]), k


def _train(mb, opt, steps=3, **kw):
    eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
    for _ in range(steps):
        eng.train_step(torch.randn(8, 5), torch.randn(8, 3), **kw)


def test_load_copy_reset_touch_only_their_slot():
    models = make_models(4, bn=True)
    mb = rmb.ModelBatch(models)
    opt = rmb.optim.Adam(mb, lr=[0.01, 0.02, 0.03, 0.04])
    _train(mb, opt)
    before = _snapshot(mb, opt)

    mb.copy_slot(0, 2)
    after = _snapshot(mb, opt)
    _rows_equal(before, after, [0, 1, 3])
    for k in before:
        assert torch.equal(after[k][2], before[k][0]), k  # weights, buffers, moments, step count
    assert opt.get_hparams(2)["lr"] == pytest.approx(0.03)  # hyperparameters stay the recipient's

    new = MLP(bn=True)
    mb.reset_slot(3, new)
    after2 = _snapshot(mb, opt)
    _rows_equal(after, after2, [0, 1, 2])
    for k, v in new.state_dict().items():
        assert torch.equal(mb.slot_state(3)[k], v)
    assert float(opt.steps[3]) == 0 and all(float(v[3].abs().sum()) == 0 for v in opt.state[torch.float32].values())

    mb.load_slot(1, models[0].state_dict())
    for k, v in models[0].state_dict().items():
        assert torch.equal(mb.slot_state(1)[k], v)
    with pytest.raises(IncompatibleModelsError, match="missing keys"):
        mb.load_slot(1, {"0.weight": torch.zeros(8, 5)})
    with pytest.raises(IncompatibleModelsError, match="shape"):
        mb.load_slot(1, MLP(bn=True, hidden=9).state_dict())


def test_inactive_slots_do_not_change_in_training():
    mb = rmb.ModelBatch(make_models(5, bn=True))
    opt = rmb.optim.Adam(mb, lr=0.05)
    _train(mb, opt, steps=2)
    mb.deactivate([1, 3])
    before = _snapshot(mb, opt)
    _train(mb, opt, steps=3)  # engine default: active slots only
    after = _snapshot(mb, opt)
    _rows_equal(before, after, [1, 3])
    assert not torch.equal(before["0.weight"][0], after["0.weight"][0])
    # A forward over all slots in train mode must not touch inactive BatchNorm statistics either.
    mb(torch.randn(8, 5))
    _rows_equal(before, _snapshot(mb, opt), [1, 3])
    assert mb(torch.randn(8, 5), slots="active").shape[0] == 3


def _step_flops(mb, opt):
    eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
    x, y = torch.randn(32, 64), torch.randn(32, 64)
    with FlopCounterMode(display=False) as counter:
        eng.train_step(x, y)
    return counter.get_total_flops()


def test_step_cost_follows_active_slots():
    models = [nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)) for _ in range(16)]
    mb = rmb.ModelBatch(models)
    opt = rmb.optim.SGD(mb, lr=0.1)
    full = _step_flops(mb, opt)
    mb.deactivate(range(2, 16))
    two = _step_flops(mb, opt)
    assert full > 0
    assert two == pytest.approx(full * 2 / 16, rel=0.01)


def test_resize_keeps_live_slots_and_training_continues():
    models = make_models(4, bn=True)
    mb = rmb.ModelBatch(models)
    opt = rmb.optim.AdamW(mb, lr=[0.01, 0.02, 0.03, 0.04])
    scaler = rmb.SlotGradScaler(mb, init_scale=8.0)
    _train(mb, opt)
    before = _snapshot(mb, opt)

    mb.resize(6)  # grow: new slots empty and inactive
    assert mb.num_slots == 6 and mb.active.tolist() == [True] * 4 + [False] * 2
    grown = _snapshot(mb, opt)
    for k in before:
        assert torch.equal(grown[k][:4], before[k]), k
    assert [opt.get_hparams(i)["lr"] for i in range(4)] == pytest.approx([0.01, 0.02, 0.03, 0.04])
    assert scaler.scales.shape == (6,)
    mb.reset_slot(5, MLP(bn=True))
    opt.set_hparams(5, lr=0.5)
    mb.activate(5)
    _train(mb, opt)
    assert float(opt.steps[5]) == 3 and float(opt.steps[4]) == 0

    state = _snapshot(mb, opt)
    mb.deactivate(0)
    with pytest.raises(ValueError, match="drop active slots"):
        mb.resize(3)
    mb.resize(3, keep=[5, 2, 1])  # shrink, reorder
    shrunk = _snapshot(mb, opt)
    for k in state:
        assert torch.equal(shrunk[k], state[k][[5, 2, 1]]), k
    assert opt.get_hparams(0)["lr"] == pytest.approx(0.5)
    _train(mb, opt)
    assert opt.steps.tolist() == [6.0, 9.0, 9.0]


def test_dropout_masks_differ_per_slot_and_per_step():
    one = MLP(dropout=0.5)
    mb = rmb.ModelBatch(clones([one] * 4))  # identical weights in every slot
    x = torch.randn(16, 5)
    a, b = mb(x), mb(x)
    for i in range(1, 4):
        assert not torch.equal(a[0], a[i])  # independent masks across slots
    assert not torch.equal(a, b)  # and across steps
    mb.eval()
    e = mb(x)
    assert torch.equal(e[0], e[3])  # no dropout in eval


def test_batchnorm_keeps_per_slot_running_stats():
    models = make_models(3, bn=True)
    refs = clones(models)
    mb = rmb.ModelBatch(models)
    opt = rmb.optim.SGD(mb, lr=0.1)
    ropts = [torch.optim.SGD(r.parameters(), lr=0.1) for r in refs]
    eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
    for _ in range(5):
        x, y = torch.randn(8, 5), torch.randn(8, 3)
        eng.train_step(x, y)
        for r, o in zip(refs, ropts):
            o.zero_grad()
            nn.functional.mse_loss(r(x), y).backward()
            o.step()
    for i, r in enumerate(refs):
        st = mb.slot_state(i)
        torch.testing.assert_close(st["1.running_mean"], r[1].running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st["1.running_var"], r[1].running_var, rtol=1e-5, atol=1e-6)
        assert int(st["1.num_batches_tracked"]) == 5
    assert not torch.allclose(mb.buffers["1.running_mean"][0], mb.buffers["1.running_mean"][1])
    mb.eval()
    x = torch.randn(4, 5)
    out = mb(x)
    for i, r in enumerate(refs):
        torch.testing.assert_close(out[i], r.eval()(x), rtol=1e-5, atol=1e-6)


def test_grads_reset_to_none_are_recovered():
    mb = rmb.ModelBatch(make_models(2))
    opt = rmb.optim.SGD(mb, lr=0.1)
    for p in mb.parameters():
        p.grad = None  # what torch's zero_grad(set_to_none=True) does
    before = mb.params["0.weight"].detach().clone()
    losses, _ = mb.forward_loss(torch.randn(4, 5), torch.randn(4, 3), nn.functional.mse_loss)
    losses.sum().backward()
    opt.step()
    assert not torch.equal(before, mb.params["0.weight"])


def test_evaluate_per_slot_data_for_a_subset_of_slots():
    models = make_models(3)
    mb = rmb.ModelBatch(models)
    eng = rmb.FusedEngine(mb, rmb.optim.SGD(mb, lr=0.1), nn.functional.mse_loss)
    xs, ys = torch.randn(3, 6, 5), torch.randn(3, 6, 3)
    got = eng.evaluate(xs, ys, slots=[0, 2], per_slot=True, batch_size=4)["loss"]
    want = [nn.functional.mse_loss(models[i](xs[i]), ys[i]).item() for i in (0, 2)]
    assert got.tolist() == pytest.approx(want, rel=1e-5)


def test_all_slots_take_the_path_without_gathers():
    """Naming every slot (as a list, tensor or "active") must not gather/scatter the stacked weights."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gathers = {"index_select.default", "index_copy_.default", "index_add.default"}

    class Ops(TorchDispatchMode):
        """The gathers and scatters that touch the stack's flat buffers (weights, gradients, optimizer state)."""

        def __init__(self, stack: set):
            super().__init__()
            self.stack, self.names = stack, set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__ in gathers and args[0].untyped_storage().data_ptr() in self.stack:
                self.names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    mb = rmb.ModelBatch(make_models(3))
    opt = rmb.optim.Adam(mb, lr=0.1)
    eng = rmb.FusedEngine(mb, opt, nn.functional.mse_loss)
    eng.train_step(torch.randn(4, 5), torch.randn(4, 3))  # the optimizer's state exists from here on

    def stack() -> set:
        flat = [t for g in mb.groups.values() for t in (g.data, g.grad)]
        flat += [v for st in opt.state.values() for v in st.values()]
        return {t.untyped_storage().data_ptr() for t in flat}

    for slots in ("active", [0, 1, 2], torch.arange(3)):
        with Ops(stack()) as ops:
            eng.train_step(torch.randn(4, 5), torch.randn(4, 3), slots=slots)
        assert not ops.names, slots
    mb.deactivate(1)
    with Ops(stack()) as ops:
        eng.train_step(torch.randn(4, 5), torch.randn(4, 3))
    assert "index_select.default" in ops.names  # the subset path gathers, as it should


def test_slot_indices_are_checked_and_every_slot_in_order_means_no_index():
    mb = rmb.ModelBatch(make_models(4))
    assert mb.resolve_slots([0, 1, 2, 3]) is None and mb.resolve_slots(torch.arange(4)) is None
    assert mb.resolve_slots([1, 0, 2, 3]).tolist() == [1, 0, 2, 3]  # every slot, not in order: an index
    assert mb.resolve_slots(torch.tensor([[2], [0]])).tolist() == [2, 0]
    assert mb.resolve_slots(3).tolist() == [3]
    for bad in ([0, 4], [-1], torch.tensor([5, 1])):
        with pytest.raises(IndexError, match="out of range for a batch of 4 slots"):
            mb.resolve_slots(bad)
    with pytest.raises(IndexError):
        mb.set_active([7], False)


# ------------------------------------------------------------------------------ direct path
def test_direct_path_matches_vmap_for_linear_models():
    """Linear + elementwise models skip vmap; outputs and gradients equal the vmap path's, for shared
    and per-slot inputs, all slots or a subset, and 3-D inputs to a Linear; layers without a direct kernel
    (Softmin) use vmap. (Convolutions and BatchNorm: tests/test_direct_conv.py; LayerNorm, embeddings,
    attention: tests/test_direct_layers.py.)"""
    models = make_models(6)
    direct, vmapped = rmb.ModelBatch(clones(models)), rmb.ModelBatch(clones(models), direct_path=False)
    assert direct.uses_direct_path and not vmapped.uses_direct_path
    assert not rmb.ModelBatch([nn.Sequential(nn.Linear(5, 8), nn.Softmin(1), nn.Linear(8, 3))] * 2).uses_direct_path
    x, xs, y = torch.randn(16, 5), torch.randn(6, 16, 5), torch.randn(16, 3)
    for slots in (None, [4, 1]):
        torch.testing.assert_close(direct(x, slots=slots), vmapped(x, slots=slots))
        xin = xs if slots is None else xs[slots]
        torch.testing.assert_close(direct(xin, per_slot=True, slots=slots), vmapped(xin, per_slot=True, slots=slots))
        for mb in (direct, vmapped):
            mb.zero_grad()
            loss, _ = mb.forward_loss(x, y, nn.functional.mse_loss, slots=slots)
            loss.sum().backward()
            mb.sync_grads()
        for name in direct.params:
            torch.testing.assert_close(direct.params[name].grad, vmapped.params[name].grad, rtol=1e-5, atol=1e-7)
    seq = torch.randn(16, 4, 5)  # [B, T, features]: every leading dimension is a row of the slot's GEMM
    torch.testing.assert_close(direct(seq), vmapped(seq))


def test_direct_path_dropout_draws_a_mask_per_slot():
    mb = rmb.ModelBatch([nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 8, bias=False))] * 4)
    assert mb.uses_direct_path
    with torch.no_grad():
        for i in range(4):
            mb.params["1.weight"][i].copy_(torch.eye(8))
    out = mb(torch.ones(32, 8))  # dropout on the shared input itself
    assert not torch.equal(out[0], out[1]) and set(out.unique().tolist()) == {0.0, 2.0}
    mb.eval()
    assert torch.equal(mb(torch.ones(32, 8)), torch.ones(4, 32, 8))


def test_direct_path_keeps_python_side_effects_and_mode_branches():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.calls = nn.Linear(3, 2), 0

        def forward(self, x):
            self.calls += 1  # a traced graph would drop this: such models stay on vmap
            return self.lin(x)

    class TrainShift(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            h = self.lin(x)
            return torch.tanh(h) if self.training else h  # fixed by a trace: one plan per mode

    mb = rmb.ModelBatch([Counting(), Counting()])
    assert not mb.uses_direct_path
    mb(torch.randn(4, 3))
    mb(torch.randn(4, 3))
    assert mb._template.calls == 2
    mb = rmb.ModelBatch([TrainShift(), TrainShift()])
    x = torch.randn(4, 3)
    assert mb.uses_direct_path
    train_out = mb(x)
    mb.eval()
    assert mb.uses_direct_path
    torch.testing.assert_close(train_out, torch.tanh(mb(x)))


# weights below and above fast_path.DIRECT_WRITE_MIN elements; oneDNN only takes the large ones
@pytest.mark.parametrize("hidden,cpu_gemm", [(8, "blas"), (160, "blas"), (160, "onednn")])
def test_gradients_into_buffer_write_what_autograd_would(hidden, cpu_gemm):
    """In the engine's mode the backward writes weight and bias gradients straight into the flat
    buffer. Per slot they equal a plain model's, a second backward adds to them (torch semantics),
    frozen parameters get none, and autograd never allocates them (``p.grad`` is the buffer view)."""
    from ray_modelbatch import fast_path

    models = make_models(4, d_in=120, hidden=hidden)
    assert (hidden * 120 >= fast_path.DIRECT_WRITE_MIN) == (hidden == 160)
    for m in models:
        m[0].bias.requires_grad_(False)  # frozen: lives outside the flat buffer
    mb = rmb.ModelBatch(clones(models), cpu_gemm=cpu_gemm)
    assert mb.uses_direct_path
    x, y, xs = torch.randn(16, 120), torch.randn(16, 3), torch.randn(4, 16, 120)
    for per_slot in (False, True):
        inp, tgt = (xs, y.expand(4, *y.shape)) if per_slot else (x, y)
        mb.zero_grad()
        for _ in range(2):  # the second backward accumulates
            with mb.gradients_into_buffer():
                losses, _ = mb.forward_loss(inp, tgt, nn.functional.mse_loss, per_slot=per_slot)
            losses.sum().backward()
        for name, p in mb.named_parameters():
            assert p.grad is mb._grad_views[name], name  # written in place, nothing to copy
        for i, m in enumerate(models):
            m.zero_grad()
            for _ in range(2):
                nn.functional.mse_loss(m(inp[i] if per_slot else inp), y).backward()
            for name, p in m.named_parameters():
                if p.requires_grad:
                    torch.testing.assert_close(mb.params[name].grad[i], p.grad, rtol=1e-5, atol=1e-6)
        assert mb.params["0.bias"].grad is None
    # A gradient tensor someone assigned is carried into the buffer, and the backward adds to it.
    w = mb.params["2.weight"]
    w.grad = torch.ones_like(w)
    with mb.gradients_into_buffer():
        losses, _ = mb.forward_loss(x, y, nn.functional.mse_loss)
    losses.sum().backward()
    assert w.grad is mb._grad_views["2.weight"]
    models[2].zero_grad()
    nn.functional.mse_loss(models[2](x), y).backward()
    torch.testing.assert_close(w.grad[2], models[2][2].weight.grad + 1, rtol=1e-5, atol=1e-6)
    # Outside the block, gradients reach autograd as usual (torch.autograd.grad sees them).
    losses, _ = mb.forward_loss(x, y, nn.functional.mse_loss)
    grads = torch.autograd.grad(losses.sum(), [mb.params["2.weight"]])
    models[1].zero_grad()
    nn.functional.mse_loss(models[1](x), y).backward()
    torch.testing.assert_close(grads[0][1], models[1][2].weight.grad, rtol=1e-5, atol=1e-6)


def test_cpu_gemm_choice_is_checked(monkeypatch):
    from ray_modelbatch import fast_path

    with pytest.raises(ValueError, match="cpu_gemm='mkl'.*'blas', 'onednn'"):
        rmb.ModelBatch(make_models(2), cpu_gemm="mkl")
    monkeypatch.setattr(fast_path, "onednn_available", lambda: False)
    with pytest.raises(ValueError, match="no oneDNN.*use cpu_gemm='blas'"):
        rmb.ModelBatch(make_models(2), cpu_gemm="onednn")


@pytest.mark.parametrize("d_in,hidden,cpu_gemm", [(5, 8, "blas"), (120, 160, "onednn")])
def test_direct_path_input_gradient_and_double_backward(d_in, hidden, cpu_gemm):
    """Gradients w.r.t. inputs that require grad (shared or per slot), and a gradient penalty
    (double backward through them), match plain models' on the direct path."""
    models = make_models(3, d_in=d_in, hidden=hidden)
    mb = rmb.ModelBatch(clones(models), cpu_gemm=cpu_gemm)
    assert mb.uses_direct_path
    x = torch.randn(6, d_in, requires_grad=True)
    (gx,) = torch.autograd.grad(mb(x).square().sum(), x)
    ref_gx = sum(torch.autograd.grad(m(x).square().sum(), x)[0] for m in models)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)

    xs = torch.randn(3, 6, d_in, requires_grad=True)  # per slot, so each slot's penalty is its own
    (gxs,) = torch.autograd.grad(mb(xs, per_slot=True).square().sum(), xs, create_graph=True)
    mb.zero_grad()
    gxs.square().sum().backward()
    mb.sync_grads()
    for i, m in enumerate(models):
        xi = xs[i].detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(m(xi).square().sum(), xi, create_graph=True)
        torch.testing.assert_close(gxs[i], g, rtol=1e-5, atol=1e-6)
        m.zero_grad()
        g.square().sum().backward()
        for name, p in m.named_parameters():
            torch.testing.assert_close(mb.params[name].grad[i], p.grad, rtol=1e-4, atol=1e-6)


def test_why_vmap_names_what_keeps_a_model_off_the_direct_path():
    """The first layer or call without a direct kernel, a forward fx cannot trace, or the stack's own choice."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    assert rmb.ModelBatch([nn.Sequential(nn.Linear(5, 3), nn.ReLU())] * 2).why_vmap() is None
    why = rmb.ModelBatch([nn.Sequential(nn.Linear(5, 8), nn.Softmin(1), nn.Linear(8, 3))] * 2).why_vmap()
    assert why == "module '1' (Softmin) has no direct kernel, or not with these settings"
    why = rmb.ModelBatch([Branchy(), Branchy()]).why_vmap()
    assert "cannot be traced with torch.fx" in why and "an `if`, `while` or `assert` on a tensor" in why

    class Steps(nn.Module):  # a loop over the input's length
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)

        def forward(self, x):
            for t in range(x.size(1)):
                x = x + self.fc(x)
            return x

    assert "range(self.steps)" in rmb.ModelBatch([Steps(), Steps()]).why_vmap()

    class FixedCellLoop(nn.Module):  # traceable, but the cell has no direct kernel: named as the user wrote it
        def __init__(self):
            super().__init__()
            self.cell = nn.GRUCell(5, 5)

        def forward(self, x):
            h = None
            for t in range(3):
                h = self.cell(x[:, t], h)
            return h

    assert rmb.ModelBatch([FixedCellLoop(), FixedCellLoop()]).why_vmap() == (
        "module 'cell' (GRUCell) has no direct kernel, or not with these settings")
    assert "direct_path=False" in rmb.ModelBatch([nn.Linear(5, 3)] * 2, direct_path=False).why_vmap()
    outside = torch.ones(3)

    class Masked(nn.Module):  # a tensor from outside the model: not fx's internal name for it
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(x) * outside

    assert rmb.ModelBatch([Masked(), Masked()]).why_vmap().startswith("a tensor the forward reads from outside")
    cumulative = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None))
    assert rmb.ModelBatch([cumulative] * 2).why_vmap() == ("module '1' (BatchNorm1d) keeps a cumulative average "
                                                           "(momentum=None)")

    class OneHot(nn.Module):  # one_hot without num_classes would count the largest index of all slots together
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return self.fc(nn.functional.one_hot(x).float())

    assert "function F.one_hot" in rmb.ModelBatch([OneHot(), OneHot()]).why_vmap()
    report = rmb.check_model(lambda: nn.Sequential(nn.Linear(5, 8), nn.Softmin(1), nn.Linear(8, 3)),
                             torch.randn(4, 5), slots=2, repeats=1)
    assert "not on the direct path: module '1' (Softmin)" in str(report)


def test_train_and_eval_set_every_template_module_and_call_an_overridden_train():
    """ModelBatch.train/eval flip every submodule's mode (directly for plain modules), and a model that overrides
    train() (to keep a layer frozen, say) still has it called."""
    class KeepsNormInEval(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.norm = nn.Linear(3, 3), nn.BatchNorm1d(3)

        def train(self, mode: bool = True) -> "KeepsNormInEval":
            super().train(mode)
            self.norm.eval()
            return self

        def forward(self, x):
            return self.norm(self.lin(x))

    plain = rmb.ModelBatch([nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3)) for _ in range(2)])
    for mode in (False, True, False):
        plain.train(mode)
        assert all(m.training is mode for m in plain._template.modules())
    custom = rmb.ModelBatch([KeepsNormInEval() for _ in range(2)])
    custom.eval()
    custom.train()
    assert custom._template.training and custom._template.lin.training and not custom._template.norm.training
