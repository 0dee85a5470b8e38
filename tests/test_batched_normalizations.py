"""Weight and spectral normalization, hooks and parametrizations, train fused as each model alone
(``ray_modelbatch/batched_normalizations.py``)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import ray_modelbatch as rmb
from ray_modelbatch.errors import FusionWarning

S, STEPS = 3, 4
LRS = [1e-2, 3e-3, 1e-3]

WRAPS = {
    "weight_norm hook": lambda m: nn.utils.weight_norm(m),
    "weight_norm hook dim=None": lambda m: nn.utils.weight_norm(m, dim=None),
    "weight_norm parametrization": lambda m: parametrizations.weight_norm(m),
    "spectral_norm hook": lambda m: nn.utils.spectral_norm(m),
    "spectral_norm parametrization": lambda m: parametrizations.spectral_norm(m, n_power_iterations=2),
}


class Critic(nn.Module):
    """A GAN critic's shape: a normalized convolution, a transposed one and a normalized head."""

    def __init__(self, wrap):
        super().__init__()
        self.conv = wrap(nn.Conv2d(2, 4, 3, padding=1))
        self.up = wrap(nn.ConvTranspose2d(4, 2, 2, stride=2))
        self.head = wrap(nn.Linear(2 * 8 * 8, 1))

    def forward(self, x):
        h = F.leaky_relu(self.up(F.leaky_relu(self.conv(x), 0.2)), 0.2)
        return self.head(h.flatten(1)).squeeze(1)


def _critic_loss(model, batch, config):
    """Two forwards before one backward, as a GAN critic's loss: D(real) - D(fake)."""
    real, fake = batch
    return model(fake).mean() - model(real).mean()


def _make(name, i):
    torch.manual_seed(10 + i)
    return Critic(WRAPS[name])


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", list(WRAPS))
def test_a_normalized_critic_trains_fused_like_each_model_alone(name):
    mb = rmb.ModelBatch([_make(name, i) for i in range(S)])
    engine = rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=LRS), step_fn=_critic_loss)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(S, 5, 2, 4, 4, generator=g), torch.randn(S, 5, 2, 4, 4, generator=g)) for _ in range(STEPS)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FusionWarning)  # no per-slot loop, no failed direct path
        for real, fake in batches:
            engine.train_step(real, fake, per_slot=True)
    for i in range(S):
        alone = _make(name, i)
        opt = torch.optim.Adam(alone.parameters(), lr=LRS[i])
        for real, fake in batches:
            opt.zero_grad()
            _critic_loss(alone, (real[i], fake[i]), {}).backward()
            opt.step()
        state = mb.slot_state(i)
        for k, v in alone.state_dict().items():  # the power iteration's u and v too
            torch.testing.assert_close(state[k], v, msg=k, rtol=1e-5, atol=1e-6)
        mb.eval(), alone.eval()
        torch.testing.assert_close(mb(batches[0][0], per_slot=True)[i], alone(batches[0][0][i]), rtol=1e-5, atol=1e-6)
        mb.train()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_check_model_copies_a_model_whose_hook_computes_its_weight():
    """``copy.deepcopy`` refuses ``nn.utils.weight_norm``'s computed weight; check_model copies such a model."""
    model = nn.Sequential(nn.utils.weight_norm(nn.Linear(5, 8)), nn.ReLU(), nn.Linear(8, 2))
    report = rmb.check_model(model, torch.randn(4, 5), slots=3, repeats=1)
    assert report.error is None and report.path == "vmap"
