"""Each slot's own dropout rate in one stack (ray_modelbatch.slot_dropout): trains as its model alone."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import optim
from ray_modelbatch.errors import FusionError, IncompatibleModelsError
from ray_modelbatch.slot_group import stack_key
from test_slot_random import LR, _alone, _batches, _max_rel, _seeded

RATES = [0.0, 0.2, 0.5]  # 0: that slot's model draws nothing at all


class RateMLP(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(10, 32), nn.Dropout(p), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class RateCNN(nn.Module):
    """A dropout on channel-stacked activations (``nn.Dropout``) or whole channels (``nn.Dropout2d``)."""

    def __init__(self, p, drop=nn.Dropout):
        super().__init__()
        self.conv, self.drop, self.fc = nn.Conv2d(1, 4, 3, padding=1), drop(p), nn.Linear(4 * 36, 4)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.conv(x.view(-1, 1, 6, 6)))).flatten(1))


class RateSDPA(nn.Module):
    """Attention dropout at the module's rate, as many transformer blocks pass it: ``dropout_p=self.drop.p``."""

    def __init__(self, p):
        super().__init__()
        self.qkv, self.drop, self.out = nn.Linear(2, 24), nn.Dropout(p), nn.Linear(8, 4)

    def forward(self, x):
        q, k, v = self.qkv(x.view(-1, 5, 2)).chunk(3, -1)
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=self.drop.p if self.training else 0.0)
        return self.out(self.drop(h).mean(1))


MODELS = {"mlp": (RateMLP, 10), "cnn": (RateCNN, 36), "cnn_dropout2d": (lambda p: RateCNN(p, nn.Dropout2d), 36),
          "sdpa": (RateSDPA, 10)}


def _train(name: str, direct: bool, steps=4, subset=None):
    make, features = MODELS[name]
    pairs = [_seeded(lambda p=p: make(p), s) for s, p in enumerate(RATES)]
    batches = _batches(steps, features)
    refs = [_alone(m, st, batches) for m, st in pairs]
    mb = rmb.ModelBatch([m for m, _ in pairs], direct_path=direct)
    for s, (_, st) in enumerate(pairs):
        mb.random.set_state(s, st)
    engine = rmb.FusedEngine(mb, optim.SGD(mb, lr=LR, momentum=0.9), F.cross_entropy)
    for x, y in batches:
        engine.train_step(x, y, slots=subset)
    return mb, refs


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "vmap"])
@pytest.mark.parametrize("name", list(MODELS))
def test_slots_with_their_own_dropout_rates_in_one_stack_train_like_their_models_alone(name, direct):
    if direct:
        assert rmb.ModelBatch([MODELS[name][0](p) for p in RATES]).uses_direct_path
    mb, refs = _train(name, direct)
    for s, (ref, end) in enumerate(refs):
        assert _max_rel(mb, s, ref) < 2e-5, (name, s, RATES[s])
        assert torch.equal(mb.random.state(s), end), (name, s)  # as many numbers drawn as alone (none at p=0)


def test_a_gathered_step_gives_each_row_its_own_slot_s_rate():
    """Two of three slots step (rows 0 and 1 of the forward are slots 1 and 2): rows take their slots' rates."""
    mb, refs = _train("mlp", direct=True, steps=3, subset=[1, 2])
    for s in (1, 2):
        ref, end = refs[s]
        assert _max_rel(mb, s, ref) < 2e-5 and torch.equal(mb.random.state(s), end), s


def test_models_that_differ_only_in_their_dropout_rate_share_a_stack_and_other_settings_still_split():
    assert stack_key(RateMLP(0.1)) == stack_key(RateMLP(0.45))
    other = RateMLP(0.1)
    other.drop.inplace = True
    assert stack_key(other) != stack_key(RateMLP(0.1))
    alpha = [nn.Sequential(nn.Linear(3, 3), nn.AlphaDropout(p)) for p in (0.1, 0.2)]  # one rate per stack
    assert stack_key(alpha[0]) != stack_key(alpha[1])


def test_rates_follow_load_copy_and_resize():
    mb = rmb.ModelBatch([RateMLP(p) for p in RATES])
    assert mb.rates.values["drop"].tolist() == RATES
    mb.load_slot(0, RateMLP(0.35))
    assert mb.rates.values["drop"].tolist() == [0.35, 0.2, 0.5]
    mb.load_slot(0, mb.slot_state(2))  # a state_dict carries no rate: the slot keeps its model's
    assert mb.rates.values["drop"][0] == 0.35
    mb.copy_slot(2, 1)
    assert mb.rates.values["drop"].tolist() == [0.35, 0.5, 0.5]
    mb.resize(4, keep=[2, 0])
    assert mb.rates.values["drop"].tolist()[:2] == [0.5, 0.35]


class ReadsRate(nn.Module):
    """A forward that uses its dropout rate as a number (an inverted-dropout rescale written by hand)."""

    def __init__(self, p):
        super().__init__()
        self.fc, self.drop = nn.Linear(4, 2), nn.Dropout(p)

    def forward(self, x):
        return self.fc(self.drop(x)) * (1 - self.drop.p)


def test_a_forward_that_reads_a_rate_the_slots_do_not_share_as_a_number_fails_in_one_line():
    mb = rmb.ModelBatch([ReadsRate(p) for p in (0.1, 0.3)])
    with pytest.raises(FusionError, match=r"module 'drop' has a different dropout rate in each slot.*stack_by="):
        mb(torch.randn(5, 4))
    same = rmb.ModelBatch([ReadsRate(0.2) for _ in range(2)])  # one rate: it is a number like any other
    mb_out = same.eval()(torch.randn(5, 4))
    assert mb_out.shape == (2, 5, 2)


def test_without_per_slot_generators_the_rates_must_agree():
    with pytest.raises(IncompatibleModelsError, match="dropout rates at 'drop' differ.*per_slot_random=True"):
        rmb.ModelBatch([RateMLP(0.1), RateMLP(0.2)], per_slot_random=False)
    mb = rmb.ModelBatch([RateMLP(0.1), RateMLP(0.1)], per_slot_random=False)
    with pytest.raises(IncompatibleModelsError, match="differ"):
        mb.load_slot(1, RateMLP(0.3))
    assert mb.rates.values["drop"].tolist() == [0.1, 0.1]


def test_the_template_rate_is_tied_to_its_stack_only():
    mb = rmb.ModelBatch([RateMLP(p) for p in RATES])
    p = mb._template.drop.p
    assert copy.deepcopy(p) is p and float.__float__(p) == 0.0
    import pickle

    assert type(pickle.loads(pickle.dumps(p))) is float
