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
