"""stacked_layer_norm: a stack's LayerNorms normalize in torch's faster CPU kernel (a weight of ones) and still
train every slot as its model alone, on the vmap path and the direct path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import train_fused_and_alone
from ray_modelbatch import ModelBatch
from ray_modelbatch.stacked_layer_norm import StackedLayerNorm, normalize, stack_layer_norms


class Normed(nn.Module):
    def __init__(self, norm: nn.Module | None = None):
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(5, 8), norm or nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.fc(x))))


class OwnLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,normalized", [((32, 16, 64), (64,)), ((4, 6, 7, 12), (7, 12)), ((3, 768), (768,))])
def test_normalize_is_layer_norm_without_affine(dtype, shape, normalized):
    x = (torch.randn(*shape, dtype=dtype) * 3 + 1).requires_grad_()
    x0 = x.detach().clone().requires_grad_()
    g = torch.randn(*shape, dtype=dtype)
    y, y0 = normalize(x, normalized, 1e-5), F.layer_norm(x0, normalized, None, None, 1e-5)
    y.backward(g)
    y0.backward(g)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(y, y0, atol=tol, rtol=0)
    torch.testing.assert_close(x.grad, x0.grad, atol=tol * 10, rtol=0)


def test_normalize_reads_a_weight_of_ones_on_a_cpu():
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.native_layer_norm.default:
                seen.append(args[2])
            return func(*args, **(kwargs or {}))

    with Spy():
        normalize(torch.randn(4, 8), (8,), 1e-5)
    assert len(seen) == 1 and torch.equal(seen[0], torch.ones(8))


def test_a_first_call_in_inference_mode_leaves_training_working():
    x = torch.randn(4, 13)
    with torch.inference_mode():  # the first call with this shape makes the cached weight of ones
        normalize(x, (13,), 1e-5)
    xg = x.clone().requires_grad_()
    normalize(xg, (13,), 1e-5).square().sum().backward()  # autograd saves that weight for the backward
    assert xg.grad is not None and xg.grad.isfinite().all()


def test_under_vmap_each_slot_gets_the_rules_values_forward_and_backward():
    torch.manual_seed(0)
    n = 4
    m = stack_layer_norms(nn.Sequential(nn.LayerNorm(8)))[0]
    assert type(m) is StackedLayerNorm
    x = torch.randn(n, 10, 8)
    w, b = 1 + 0.3 * torch.randn(n, 8), 0.3 * torch.randn(n, 8)

    def ours(w, b, x):
        return functional_call(m, {"weight": w, "bias": b}, (x,)).square().sum()

    def rule(w, b, x):
        return F.layer_norm(x, (8,), w, b).square().sum()

    for x_dim in (0, None):  # each slot's own input, and one input shared by the slots
        xi = x if x_dim == 0 else x[0]
        got = torch.vmap(torch.func.grad_and_value(ours, argnums=(0, 1, 2)), in_dims=(0, 0, x_dim))(w, b, xi)
        want = torch.vmap(torch.func.grad_and_value(rule, argnums=(0, 1, 2)), in_dims=(0, 0, x_dim))(w, b, xi)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_outside_vmap_it_is_the_modules_own_forward():
    torch.manual_seed(0)
    plain = nn.LayerNorm(8)
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-1, 1)
    stacked = copy.deepcopy(plain)
    stacked.__class__ = StackedLayerNorm
    x = torch.randn(3, 8)
    assert torch.equal(stacked(x), plain(x))


def test_only_plain_layer_norms_of_the_template_change():
    models = [Normed(), Normed(OwnLayerNorm(8))]
    for m in models:
        mb = ModelBatch([copy.deepcopy(m) for _ in range(2)])
        assert type(m.norm) in (nn.LayerNorm, OwnLayerNorm)  # the user's models are untouched
        assert type(mb._template.norm) is (StackedLayerNorm if type(m.norm) is nn.LayerNorm else OwnLayerNorm)


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("norm", ["affine", "no_bias", "no_affine", "own_subclass"])
def test_every_slot_trains_as_alone(direct, norm):
    torch.manual_seed(0)
    s = 3
    make = {"affine": lambda: nn.LayerNorm(8), "no_bias": lambda: nn.LayerNorm(8, bias=False),
            "no_affine": lambda: nn.LayerNorm(8, elementwise_affine=False), "own_subclass": lambda: OwnLayerNorm(8)}
    models = [Normed(make[norm]()) for _ in range(s)]
    for m in models:  # weights away from their initial ones and zeros, so that a lost affine shows
        for p in m.norm.parameters():
            with torch.no_grad():
                p.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(s, 6, 5, generator=g), torch.randint(0, 3, (s, 6), generator=g)
    mb, solo = train_fused_and_alone(models, x, y, steps=4, direct_path=direct)
    assert mb.uses_direct_path == (direct and norm != "own_subclass")
    for i in range(s):
        got = mb.slot_state(i)
        for k, v in solo[i].state_dict().items():
            torch.testing.assert_close(got[k], v, atol=1e-6, rtol=0)
