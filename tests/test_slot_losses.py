"""slot_losses: per-slot values of common losses in one call, equal to each model's own loss."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch.slot_losses import per_slot_loss

from conftest import clones, make_models


def _each(loss_fn, out, targets):
    return torch.stack([loss_fn(out[i], targets[i]) for i in range(out.shape[0])])


@pytest.mark.parametrize("loss_fn", [F.mse_loss, F.l1_loss, nn.MSELoss(), nn.L1Loss()])
def test_elementwise_losses_match_per_slot_calls(loss_fn):
    out, y, ys = torch.randn(4, 9, 3), torch.randn(9, 3), torch.randn(4, 9, 3)
    torch.testing.assert_close(per_slot_loss(loss_fn, out, y, False), _each(loss_fn, out, [y] * 4))
    torch.testing.assert_close(per_slot_loss(loss_fn, out, ys, True), _each(loss_fn, out, ys))


@pytest.mark.parametrize("loss_fn", [F.cross_entropy, nn.CrossEntropyLoss(), nn.CrossEntropyLoss(ignore_index=2)])
def test_cross_entropy_matches_per_slot_calls_including_ignored_targets(loss_fn):
    out, y, ys = torch.randn(4, 9, 5), torch.randint(0, 5, (9,)), torch.randint(0, 5, (4, 9))
    ys[1, :4] = 2  # ignored by the third loss: its mean is over the other targets
    torch.testing.assert_close(per_slot_loss(loss_fn, out, y, False), _each(loss_fn, out, [y] * 4))
    torch.testing.assert_close(per_slot_loss(loss_fn, out, ys, True), _each(loss_fn, out, ys))


def test_other_losses_and_shapes_are_left_to_vmap():
    out = torch.randn(4, 9, 3)
    assert per_slot_loss(lambda o, t: F.mse_loss(o, t), out, torch.randn(9, 3), False) is None
    assert per_slot_loss(nn.MSELoss(reduction="sum"), out, torch.randn(9, 3), False) is None
    assert per_slot_loss(F.mse_loss, out, torch.randn(9, 1), False) is None  # broadcasting target
    assert per_slot_loss(nn.CrossEntropyLoss(label_smoothing=0.1), out, torch.randint(0, 3, (9,)), False) is None
    assert per_slot_loss(nn.CrossEntropyLoss(weight=torch.ones(3)), out, torch.randint(0, 3, (9,)), False) is None
    assert per_slot_loss(F.cross_entropy, out, torch.rand(9, 3), False) is None  # class probabilities


@pytest.mark.parametrize("loss_fn", [F.mse_loss, nn.MSELoss(reduction="sum"), lambda o, t: (o - t).abs().max()])
def test_forward_loss_gives_each_slot_its_own_loss_and_gradient(loss_fn):
    """Covered losses (batched) and any other (vmapped) give the same per-slot losses and gradients."""
    models = make_models(3)
    mb = rmb.ModelBatch(clones(models))
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    losses, _ = mb.forward_loss(x, y, loss_fn)
    losses.sum().backward()
    mb.sync_grads()
    for i, m in enumerate(models):
        ref = loss_fn(m(x), y)
        ref.backward()
        torch.testing.assert_close(losses[i], ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(mb.params["0.weight"].grad[i], m[0].weight.grad, rtol=1e-5, atol=1e-6)


def test_evaluation_batches_the_loss_and_vmaps_every_other_metric_once(monkeypatch):
    """engine.evaluate: the loss through per_slot_loss, the user's metrics in one shared vmap; values equal
    each model's own."""
    from ray_modelbatch import engine as engine_mod

    calls = []
    real_vmap = torch.vmap
    monkeypatch.setattr(engine_mod.torch, "vmap", lambda *a, **k: calls.append(1) or real_vmap(*a, **k))
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)) for _ in range(3)]
    mb = rmb.ModelBatch(clones(models))
    eng = rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=1e-3), F.cross_entropy)
    x, y = torch.randn(20, 6), torch.randint(0, 4, (20,))
    fns = {"acc": lambda o, t: (o.argmax(-1) == t).float().mean(), "top": lambda o, t: o.max(-1).values.mean()}
    got = eng.evaluate(x, y, fns, slots=[0, 2])
    assert len(calls) == 1  # one vmap for both metrics; none for the loss
    for k, j in enumerate([0, 2]):
        with torch.no_grad():
            out = models[j](x)
        torch.testing.assert_close(got["loss"][k], F.cross_entropy(out, y))
        torch.testing.assert_close(got["acc"][k], fns["acc"](out, y))
        torch.testing.assert_close(got["top"][k], fns["top"](out, y))
