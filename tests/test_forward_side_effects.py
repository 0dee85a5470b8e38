"""What a forward changes besides its output reaches the stack as it reaches the model alone.

Two ways a model's forward writes state that the slot must keep: reassigning a
buffer (``self.ema = 0.9 * self.ema + ...``, not in place), and
``nn.Embedding(max_norm=...)``, which renormalizes the rows it looks up in
place. Both were silently lost on vmap's path when only some slots ran.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch.errors import FusionError


class EmaByAssignment(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, 16), nn.Linear(16, 3)
        self.register_buffer("ema", torch.zeros(16))

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        if self.training:
            self.ema = 0.9 * self.ema + 0.1 * h.mean(0).detach()
        return self.fc2(h - self.ema)


def _alone(make, i, lr, batches, cls=torch.optim.SGD):
    torch.manual_seed(100 + i)
    m = make()
    opt = cls(m.parameters(), lr=lr)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m


def _stack(make, n):
    models = []
    for i in range(n):
        torch.manual_seed(100 + i)
        models.append(make())
    return rmb.ModelBatch(models)


@pytest.mark.parametrize("where", ["every slot", "slots 0-1 (gathered)"])
def test_a_buffer_the_forward_reassigns_is_kept_in_its_slot(where):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    lrs = [0.1, 0.2, 0.3]
    mb = _stack(EmaByAssignment, 3)
    engine = rmb.FusedEngine(mb, rmb.optim.SGD(mb, lr=lrs), F.cross_entropy)
    slots = "active" if where == "every slot" else [0, 1]
    for x, y in batches:
        engine.train_step(x, y, slots=slots)
    for i in ([0, 1, 2] if where == "every slot" else [0, 1]):
        alone = _alone(EmaByAssignment, i, lrs[i], batches)
        for k, v in alone.state_dict().items():
            torch.testing.assert_close(mb.slot_state(i)[k], v, msg=k)
    if where != "every slot":
        assert torch.equal(mb.slot_state(2)["ema"], torch.zeros(16))  # slot 2 did not run


def test_a_buffer_reassigned_with_another_shape_is_named():
    class Grows(EmaByAssignment):
        def forward(self, x):
            self.ema = torch.cat([self.ema, self.ema])
            return self.fc2(torch.relu(self.fc1(x)))

    mb = _stack(Grows, 2)
    with pytest.raises(FusionError, match=r"set buffer 'ema' to shape \[32\] .* holds shape \[16\]"):
        mb(torch.randn(4, 10))


class MaxNormBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 8, max_norm=1.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.emb(x).mean(1))


def _tokens(steps=4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 30, (16, 5), generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(steps)]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("how", ["all", "one slot deactivated", "gathered slots", "one slot skipped"])
def test_max_norm_renormalizes_exactly_the_slots_that_run(how):
    batches, lrs = _tokens(), [0.05, 0.1, 0.2, 0.4]
    mb = _stack(MaxNormBag, 4)
    before = mb.slot_state(3)
    engine = rmb.FusedEngine(mb, rmb.optim.SGD(mb, lr=lrs, momentum=0.9), F.cross_entropy)
    if how == "one slot deactivated":
        mb.deactivate([3])
    for x, y in batches:
        if how == "gathered slots":
            engine.train_step(x, y, slots=[0, 1, 2])
        elif how == "one slot skipped":
            engine.train_step(x, y, slots=None, skip=torch.tensor([False, False, False, True]))
        else:
            engine.train_step(x, y)
    for i in range(3):
        alone = _alone(MaxNormBag, i, lrs[i], batches, lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
        for k, v in alone.state_dict().items():
            torch.testing.assert_close(mb.slot_state(i)[k], v, msg=k)
    if how != "all":  # slot 3 never ran: its rows were not renormalized either
        for k, v in before.items():
            assert torch.equal(mb.slot_state(3)[k], v), k


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_evaluation_of_some_slots_renormalizes_their_rows_as_torch_does():
    mb = _stack(MaxNormBag, 3)
    engine = rmb.FusedEngine(mb, rmb.optim.SGD(mb, lr=0.1), F.cross_entropy)
    x, y = _tokens(1)[0]
    before = mb.slot_state(2)["emb.weight"]
    engine.evaluate(x, y, slots=[0, 1])
    for i in (0, 1):
        torch.manual_seed(100 + i)
        alone = MaxNormBag().eval()
        alone(x)
        torch.testing.assert_close(mb.slot_state(i)["emb.weight"], alone.emb.weight.detach())
    assert torch.equal(mb.slot_state(2)["emb.weight"], before)
