"""The hand-written MLP step (ray_modelbatch.mlp_step): the same losses and gradients as autograd, per slot."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import FusedEngine, ModelBatch, optim


class FunctionalMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.a(x)))


MODELS = {
    "relu": lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4)),
    "tanh-sigmoid": lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Sigmoid(), nn.Linear(6, 4)),
    "silu-gelu-nobias": lambda: nn.Sequential(nn.Linear(5, 6, bias=False), nn.SiLU(), nn.Linear(6, 6), nn.GELU(),
                                              nn.Linear(6, 4, bias=False)),
    "gelu-tanh": lambda: nn.Sequential(nn.Linear(5, 6), nn.GELU(approximate="tanh"), nn.Linear(6, 4)),
    "functional": FunctionalMLP,
}


def _stack(make, n=4):
    torch.manual_seed(0)
    models = [make() for _ in range(n)]
    return models, ModelBatch([copy.deepcopy(m) for m in models])


def _autograd_grads(mb, x, y, loss_fn, per_slot, slots=None):
    """The direct path with autograd: the reference the hand-written step must equal."""
    mb.zero_grad()
    with mb.gradients_into_buffer():
        losses, _ = mb.forward_loss(x, y, loss_fn, per_slot=per_slot, slots=slots)
    losses.sum().backward()
    mb.sync_grads()
    return losses.detach(), {k: v.grad.clone() for k, v in mb.params.items()}


def _manual_grads(mb, x, y, loss_fn, per_slot, slots=None):
    mb.zero_grad()
    losses = mb.mlp_train_step(x, y, loss_fn, per_slot=per_slot, slots=slots)
    assert losses is not None, "the hand-written step did not apply"
    mb.sync_grads()
    return losses, {k: v.grad.clone() for k, v in mb.params.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("per_slot", [True, False])
@pytest.mark.parametrize("loss_fn", [F.cross_entropy, nn.CrossEntropyLoss(ignore_index=2), F.mse_loss, nn.L1Loss()],
                         ids=["ce", "ce-module", "mse", "l1-module"])
def test_losses_and_gradients_equal_autograds(name, per_slot, loss_fn):
    _, mb = _stack(MODELS[name])
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*((4,) if per_slot else ()), 9, 5, generator=g)
    if loss_fn in (F.mse_loss,) or isinstance(loss_fn, nn.L1Loss):
        y = torch.randn(*x.shape[:-1], 4, generator=g)
    else:
        y = torch.randint(0, 4, x.shape[:-1], generator=g)
        y.view(-1)[::5] = -100 if loss_fn is F.cross_entropy else 2  # ignored targets (the module ignores class 2)
    want_loss, want = _autograd_grads(mb, x, y, loss_fn, per_slot)
    got_loss, got = _manual_grads(mb, x, y, loss_fn, per_slot)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7, msg=k)


def test_a_gathered_step_gives_each_slot_the_whole_stacks_numbers_bit_for_bit():
    """Slots that run together with others or alone (a gather of two rows) get the same bits, so a host
    may run slots ahead and roll back (slot_group's exactness rule); the rows that do not run get zeros."""
    _, mb = _stack(MODELS["tanh-sigmoid"], n=5)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, 8, 5, generator=g), torch.randint(0, 4, (5, 8), generator=g)
    whole_loss, whole = _manual_grads(mb, x, y, F.cross_entropy, True)
    rows = torch.tensor([1, 3])
    part_loss, part = _manual_grads(mb, x[rows], y[rows], F.cross_entropy, True, slots=rows)
    assert torch.equal(part_loss, whole_loss[rows])
    for k in whole:
        assert torch.equal(part[k][rows], whole[k][rows]), k
        assert not part[k][[0, 2, 4]].any(), k


@pytest.mark.parametrize("case", ["dropout", "batch_norm", "huber", "broadcast_targets", "sequence", "autocast",
                                  "eval"])
def test_other_models_losses_and_modes_take_the_autograd_path(case):
    make = {"dropout": lambda: nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.1), nn.Linear(6, 4)),
            "batch_norm": lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 4))}
    make = make.get(case, MODELS["relu"])
    _, mb = _stack(make)
    x, y = torch.randn(4, 9, 5), torch.randint(0, 4, (4, 9))
    loss_fn = {"huber": F.huber_loss, "broadcast_targets": F.mse_loss}.get(case, F.cross_entropy)
    if case in ("huber", "broadcast_targets"):
        y = torch.randn(4, 9, 4 if case == "huber" else 1)  # [.., 1] against [.., 4]: torch broadcasts
    if case == "sequence":
        x, y = torch.randn(4, 3, 9, 5), torch.randint(0, 4, (4, 3, 9))
    if case == "eval":
        mb.eval()
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert mb.mlp_train_step(x, y, loss_fn, per_slot=True) is None
        return
    assert mb.mlp_train_step(x, y, loss_fn, per_slot=True) is None


def test_the_engine_trains_each_slot_as_torch_optim_trains_it_alone():
    """Five AdamW steps on per-slot batches, some targets ignored: every slot's weights as its model's alone."""
    models, mb = _stack(MODELS["tanh-sigmoid"])
    lrs = [1e-2, 3e-3, 1e-3, 3e-2]
    opt = optim.AdamW(mb, lr=lrs, weight_decay=0.01)
    eng = FusedEngine(mb, opt, F.cross_entropy)
    calls = []
    step = mb.mlp_train_step
    mb.mlp_train_step = lambda *a, **k: calls.append(1) or step(*a, **k)
    g = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(5):
        x, y = torch.randn(4, 16, 5, generator=g), torch.randint(0, 4, (4, 16), generator=g)
        y[:, ::7] = -100
        batches.append((x, y))
        eng.train_step(x, y, slots=None, per_slot=True)
    assert len(calls) == 5
    for i, model in enumerate(models):
        solo = torch.optim.AdamW(model.parameters(), lr=lrs[i], weight_decay=0.01)
        for x, y in batches:
            solo.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            solo.step()
        for (name, a), b in zip(mb.slot_module(i, MODELS["tanh-sigmoid"]()).named_parameters(), model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"slot {i} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, classes", [(64, 10), (100, 7), (37, 33)])
def test_cross_entropy_without_ignored_targets_is_the_general_form_to_the_bit(batch, classes, dtype):
    """The CPU shortcut for batches with no ignored target gives the general form's bits (losses and gradient)."""
    from ray_modelbatch.mlp_step import _cross_entropy, _cross_entropy_all_valid

    torch.manual_seed(batch)
    out = torch.randn(5, batch, classes, dtype=dtype) * 3
    target = torch.randint(0, classes, (5, batch))
    fast = _cross_entropy_all_valid(out.clone(), target)
    general = _cross_entropy(out.clone(), target, torch.ones_like(target, dtype=torch.bool))
    assert torch.equal(fast[0], general[0]) and torch.equal(fast[1], general[1])
