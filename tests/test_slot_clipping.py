"""ray_modelbatch.clip_grad_norm_: each slot clipped by its own norm, as torch clips its model alone.

And torch's own ``clip_grad_norm_`` over a stack's parameters, which would
clip every slot by one norm over all of them, is refused in one line.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import optim
from ray_modelbatch.slot_clipping import SlotClippingError

S = 3


def _models(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(S)]


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    # inputs scaled by slot-independent factors so that some steps clip and some do not
    return [(torch.randn(10, 6, generator=g) * (1 + 3 * (i % 2)), torch.randint(0, 3, (10,), generator=g))
            for i in range(n)]


@pytest.mark.parametrize("norm_type, max_norm", [(2.0, 0.8), (1.0, 5.5), (math.inf, 0.3)])
def test_each_slot_is_clipped_as_its_model_alone(norm_type: float, max_norm: float) -> None:
    models = _models()
    alone = [copy.deepcopy(m) for m in models]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    opt = optim.SGD(mb, lr=0.1, momentum=0.9)
    refs = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in alone]
    clipped = [0] * S
    for x, y in _batches(6):
        opt.zero_grad()
        losses, _ = mb.forward_loss(x, y, F.cross_entropy)
        losses.sum().backward()
        norms = rmb.clip_grad_norm_(mb.parameters(), max_norm, norm_type=norm_type)
        assert norms.shape == (S,)
        opt.step()
        for i, (m, o) in enumerate(zip(alone, refs)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            want = torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm, norm_type=norm_type)
            torch.testing.assert_close(norms[i], want, rtol=1e-6, atol=0)
            clipped[i] += bool(want > max_norm)
            o.step()
    assert all(0 < c < 6 for c in clipped), clipped  # both kinds of step were taken
    for i, m in enumerate(alone):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(mb.slot_state(i)[k], v, rtol=1e-5, atol=1e-7)


def test_torchs_clip_grad_norm_over_a_stack_is_refused_in_one_line() -> None:
    mb = rmb.ModelBatch(_models())
    x, y = _batches(1)[0]
    losses, _ = mb.forward_loss(x, y, F.cross_entropy)
    losses.sum().backward()
    before = [p.grad.clone() for p in mb.parameters()]
    with pytest.raises(SlotClippingError, match=r"ray_modelbatch\.clip_grad_norm_\(mb\.parameters\(\), max_norm\)"):
        torch.nn.utils.clip_grad_norm_(mb.parameters(), 0.5)
    for g, b in zip((p.grad for p in mb.parameters()), before):  # nothing was scaled
        assert torch.equal(g, b)
    # every other use of the list is a list's; clip_grad_value_ clamps each element alone, so it is per slot
    assert len(list(mb.parameters())) == 4 and sum(p.numel() for p in mb.parameters()) == S * (6 * 8 + 8 + 8 * 3 + 3)
    torch.nn.utils.clip_grad_value_(mb.parameters(), 0.01)
    assert max(float(p.grad.abs().max()) for p in mb.parameters()) <= 0.01


def test_a_slot_with_a_nonfinite_norm_harms_no_other() -> None:
    mb = rmb.ModelBatch(_models())
    x, y = _batches(1)[0]
    losses, _ = mb.forward_loss(x, y, F.cross_entropy)
    losses.sum().backward()
    first = next(iter(mb.parameters()))
    first.grad[1, 0, 0] = math.inf
    healthy = [p.grad[[0, 2]].clone() for p in mb.parameters()]
    with pytest.raises(RuntimeError, match=r"slots \[1\] is non-finite"):
        rmb.clip_grad_norm_(mb, 0.5, error_if_nonfinite=True)
    norms = rmb.clip_grad_norm_(mb, 1e-3)  # a ModelBatch itself works too
    assert math.isinf(norms[1]) and torch.isfinite(norms[[0, 2]]).all()
    for p, h in zip(mb.parameters(), healthy):
        torch.testing.assert_close(p.grad[[0, 2]], h * (1e-3 / (norms[[0, 2]] + 1e-6)).view(2, *[1] * (h.dim() - 1)))


def test_gradients_without_a_slot_dimension_are_refused() -> None:
    w = torch.zeros(3, requires_grad=True)
    w.grad = torch.ones(3)
    v = torch.zeros((), requires_grad=True)
    v.grad = torch.ones(())
    with pytest.raises(rmb.HyperparameterError, match="slot on dimension 0"):
        rmb.clip_grad_norm_([w, v], 1.0)
