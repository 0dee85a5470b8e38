"""slot_agreement: check_model's comparison of fused slots with their models alone, on the user's own model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import check_model, fast_path, slot_agreement


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def _mse(out, _):
    return out.pow(2).mean()


def _models(make, n=4):
    torch.manual_seed(0)
    return [make() for _ in range(n)]


def test_a_cnn_with_batchnorm_and_dropout_agrees_in_training_and_evaluation():
    got = slot_agreement.compare(_models(_cnn), torch.randn(5, 1, 8, 8), _mse, None)
    assert got.agrees
    # rounding of batched kernels, no more (the largest: the convolution's bias before BatchNorm, whose exact
    # gradient is zero, rounding noise both ways)
    assert got.train < 1e-4 and got.eval < 1e-5, got
    assert "agree" in str(got) and "DIFFER" not in str(got)


def _plain_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_a_wrong_fused_kernel_is_reported_by_check_model(monkeypatch):
    """A fused convolution that is 1% off is a difference far beyond rounding: check_model says so. (Not
    before a BatchNorm in training, which would normalize a scale away: evaluation would still see it.)"""
    right = fast_path._CONV_FNS[nn.Conv2d]
    monkeypatch.setitem(fast_path._CONV_FNS, nn.Conv2d, lambda *a: right(*a) * 1.01)
    got = slot_agreement.compare(_models(_plain_cnn), torch.randn(5, 1, 8, 8), _mse, None)
    assert not got.agrees and got.train > 1e-3 and got.eval > 1e-3
    assert slot_agreement.compare(_models(_cnn), torch.randn(5, 1, 8, 8), _mse, None).eval > 1e-3
    report = check_model(_plain_cnn, torch.randn(5, 1, 8, 8), slots=2, loss=_mse, repeats=1)
    assert not report.agreement.agrees
    assert "DIFFER" in str(report) and "please report it" in str(report)


def test_each_slot_is_compared_on_its_models_own_dropout_masks():
    """Without each model alone starting from its slot's generator state, dropout alone would differ: the
    training comparison covers the draws, not only the deterministic layers."""
    models = _models(lambda: nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 2)))
    assert slot_agreement.compare(models, torch.randn(8, 6), _mse, None).train < 1e-6
    original = slot_agreement._set_global_state
    try:  # the models alone draw from wherever torch's generator is
        slot_agreement._set_global_state = lambda device, state: None
        assert slot_agreement.compare(models, torch.randn(8, 6), _mse, None).train > 1e-2
    finally:
        slot_agreement._set_global_state = original


def test_noise_drawn_in_eval_mode_starts_from_the_same_state_both_ways():
    class Sampler(nn.Module):  # a VAE samples in eval mode too
        def __init__(self):
            super().__init__()
            self.mu, self.log_var = nn.Linear(6, 3), nn.Linear(6, 3)

        def forward(self, x):
            mu, log_var = self.mu(x), self.log_var(x)
            return mu + torch.randn_like(mu) * (0.5 * log_var).exp()

    got = slot_agreement.compare(_models(Sampler), torch.randn(8, 6), _mse, None)
    assert got.eval < 1e-6 and got.train < 1e-6, got


def test_the_hand_written_mlp_step_is_what_training_compares(monkeypatch):
    """An MLP with a cross-entropy trains through the hand-written step (no autograd), as FusedEngine runs it:
    its losses and gradients are what training compares (its outputs, evaluation)."""
    models = _models(lambda: nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    from ray_modelbatch import ModelBatch

    right, calls = ModelBatch.mlp_train_step, []

    def counted(self, *a, **k):
        losses = right(self, *a, **k)
        calls.append(losses is not None)
        return losses

    monkeypatch.setattr(ModelBatch, "mlp_train_step", counted)
    assert slot_agreement.compare(models, x, F.cross_entropy, y).agrees and calls == [True]

    def off_by_one_percent(self, *a, **k):
        losses = right(self, *a, **k)
        with torch.no_grad():
            for p in self.params.values():
                p.grad.mul_(1.01)
        return losses

    monkeypatch.setattr(ModelBatch, "mlp_train_step", off_by_one_percent)
    got = slot_agreement.compare(models, x, F.cross_entropy, y)
    assert not got.agrees and "gradient" in got.train_at and got.eval < 1e-6


def test_torchs_global_generator_and_the_users_models_are_left_as_they_were():
    models = _models(_cnn)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    x = torch.randn(5, 1, 8, 8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    slot_agreement.compare(models, x, _mse, None)
    assert torch.equal(torch.get_rng_state(), state)
    for m, b in zip(models, before):
        for k, v in m.state_dict().items():
            assert torch.equal(v, b[k]), k  # running statistics included


def test_an_unfusable_comparison_is_reported_not_raised():
    report = check_model(lambda: nn.Linear(4, 2), torch.randn(3, 4), slots=2, loss=lambda o, y: o.sum(),
                         repeats=1)  # a sum over the batch: fine
    assert report.agreement is not None and report.agreement.agrees
