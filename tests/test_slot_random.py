"""Dropout and random draws in a fused stack: each slot draws its own model's numbers, whatever runs beside it.

A slot's generator starts where the global generator was after its model was
built under its seed, so on the CPU a fused slot trains like the model alone
with dropout on (direct path and vmap) or with noise drawn in a user's step,
bit for bit in its masks: the parameters after a few SGD steps agree to float
rounding (they move apart by more than 1e-3 if the masks differ). And a
slot's draws do not depend on its neighbours, on masked or failed steps, or
on evaluations.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import optim
from ray_modelbatch.model_parts import OptimizerSet
from ray_modelbatch.slot_random import SlotRandom, global_state

S, STEPS, LR = 3, 4, 0.05


class DropMLP(nn.Module):
    """nn.Dropout on a hidden layer and F.dropout in forward (on the shared input too)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(10, 32), nn.Dropout(0.3), nn.Linear(32, 4)

    def forward(self, x):
        x = F.dropout(x, 0.2, self.training)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


class DropCNN(nn.Module):
    """Dropout on channel-stacked convolution activations (``nn.Dropout``, or ``nn.Dropout2d``)."""

    def __init__(self, drop: type[nn.Module] = nn.Dropout):
        super().__init__()
        self.conv, self.drop, self.fc = nn.Conv2d(1, 4, 3, padding=1), drop(0.25), nn.Linear(4 * 36, 4)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.conv(x.view(-1, 1, 6, 6)))).flatten(1))


class DropTransformer(nn.Module):
    """TransformerEncoder layers with dropout: attention dropout (SDPA) and the layers' own dropouts."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(2, 8)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True), 2,
                                         enable_nested_tensor=False)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.enc(self.inp(x.view(-1, 5, 2))).mean(1))


class DropAttentionWeights(nn.Module):
    """nn.MultiheadAttention returning its weights: dropout on the attention weights themselves."""

    def __init__(self):
        super().__init__()
        self.inp, self.attn, self.out = nn.Linear(2, 8), nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True), \
            nn.Linear(8, 4)

    def forward(self, x):
        h = self.inp(x.view(-1, 5, 2))
        a, w = self.attn(h, h, h, need_weights=True)
        return self.out(a.mean(1)) + w.sum()


class DropSDPA(nn.Module):
    """F.scaled_dot_product_attention with dropout_p, called by the model itself."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(2, 24), nn.Linear(8, 4)

    def forward(self, x):
        q, k, v = self.qkv(x.view(-1, 5, 2)).chunk(3, -1)
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=0.25 if self.training else 0.0)
        return self.out(h.mean(1))


class DropLSTM(nn.Module):
    """A two-layer LSTM with dropout between its layers."""

    def __init__(self):
        super().__init__()
        self.rnn, self.out = nn.LSTM(2, 8, num_layers=2, dropout=0.3, batch_first=True), nn.Linear(8, 4)

    def forward(self, x):
        y, _ = self.rnn(x.view(-1, 5, 2))
        return self.out(y[:, -1])


class DropConv1d(nn.Module):
    """``F.dropout1d`` on a Conv1d's channels (and ``nn.Dropout2d`` in DropCNN): one mask value per sample and
    channel, on the direct path."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(1, 4, 3, padding=1), nn.Linear(4 * 36, 4)

    def forward(self, x):
        return self.fc(F.dropout1d(torch.relu(self.conv(x.unsqueeze(1))), 0.3, self.training).flatten(1))


class DropSoftmax(nn.Module):
    """Hand-written attention over 5 tokens: ``F.softmax`` of short rows (through short_softmax), then dropout on
    the probabilities, whose mask a slot draws in the order its model alone draws it."""

    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(2, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.inp(x.view(-1, 5, 2))
        p = F.dropout(F.softmax(h @ h.transpose(1, 2), -1), 0.3, self.training)
        return self.out((p @ h).mean(1))


class Reparameterized(nn.Module):
    """A VAE's reparameterized sample drawn in forward (``randn_like``), uniform noise (``rand_like``), noise of a
    value's size (``torch.randn(z.shape)``) and of sizes given one by one (``torch.randn(x.size(0), 4)``, which
    fx cannot trace by itself), and zeros made the same way."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(10, 8), nn.Linear(4, 4)

    def forward(self, x):
        mu, log_var = self.enc(x).chunk(2, -1)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * log_var)
        z = z + 0.1 * torch.rand_like(z) + 0.1 * torch.randn(z.shape)
        return self.dec(z + 0.1 * torch.randn(x.size(0), 4) + torch.zeros(x.size(0), 4))


MODELS = {"mlp": DropMLP, "cnn": DropCNN, "cnn_dropout2d": lambda: DropCNN(nn.Dropout2d),
          "conv1d_dropout1d": DropConv1d, "transformer": DropTransformer, "attention_weights": DropAttentionWeights,
          "softmax_dropout": DropSoftmax, "sdpa": DropSDPA, "lstm": DropLSTM, "reparameterized": Reparameterized}


def _batches(n: int, features: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(16, features, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def _seeded(make, s: int) -> tuple[nn.Module, torch.Tensor]:
    """The model a script builds after ``torch.manual_seed(100 + s)``, and where its dropout draws from then."""
    torch.manual_seed(100 + s)
    model = make()
    return model, global_state("cpu")


def _features(name: str) -> int:
    return 36 if name.startswith(("cnn", "conv1d")) else 10


def _cross_entropy_step(model, batch, config):
    return F.cross_entropy(model(batch[0]), batch[1])


def _alone(model: nn.Module, state: torch.Tensor, batches, step=_cross_entropy_step) -> tuple[nn.Module, torch.Tensor]:
    """The model trained by itself with torch.optim.SGD (``step`` gives the loss), drawing from the global
    generator from ``state`` on; and where that generator ended.

    SGD, not Adam: Adam turns the rounding noise of gradients that are zero in exact arithmetic (an attention
    key's bias) into learning-rate-sized steps, which would hide what is compared here: the masks."""
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    saved = torch.get_rng_state()
    torch.set_rng_state(state)
    try:
        for x, y in batches:
            opt.zero_grad()
            step(model, (x, y), {}).backward()
            opt.step()
        end = torch.get_rng_state()
    finally:
        torch.set_rng_state(saved)
    return model, end


def _fused(models: list[nn.Module], states: list[torch.Tensor]) -> tuple[rmb.ModelBatch, rmb.FusedEngine]:
    mb = rmb.ModelBatch(models)
    for s, st in enumerate(states):
        mb.random.set_state(s, st)
    return mb, rmb.FusedEngine(mb, optim.SGD(mb, lr=LR, momentum=0.9), F.cross_entropy)


def _max_rel(mb: rmb.ModelBatch, s: int, ref: nn.Module) -> float:
    worst = 0.0
    for k, v in ref.state_dict().items():
        got = mb.slot_state(s)[k]
        worst = max(worst, float((got - v).abs().max() / (v.abs().max() + 1e-12)))
    return worst


@pytest.mark.parametrize("name", list(MODELS))
def test_a_fused_slot_with_dropout_trains_like_its_model_alone(name):
    make = MODELS[name]
    pairs = [_seeded(make, s) for s in range(S)]
    batches = _batches(STEPS, _features(name))
    refs = [_alone(m, st, batches) for m, st in pairs]
    mb, engine = _fused([m for m, _ in pairs], [st for _, st in pairs])
    assert mb.uses_direct_path
    for x, y in batches:
        engine.train_step(x, y)
    for s, (ref, end) in enumerate(refs):
        # A mask drawn differently moves weights by ~LR x gradient (relative 1e-3 or more: see the next test).
        assert _max_rel(mb, s, ref) < 2e-5, (name, s)
        assert torch.equal(mb.random.state(s), end), (name, s)  # and it drew as many numbers


def test_without_the_seeded_states_the_masks_differ():
    """The check above can fail: slots seeded otherwise draw other masks, and their weights move apart."""
    pairs = [_seeded(DropMLP, s) for s in range(S)]
    batches = _batches(STEPS, 10)
    refs = [_alone(m, st, batches)[0] for m, st in pairs]
    mb, engine = _fused([m for m, _ in pairs], [torch.Generator().manual_seed(1 + s).get_state() for s in range(S)])
    for x, y in batches:
        engine.train_step(x, y)
    assert all(_max_rel(mb, s, refs[s]) > 1e-3 for s in range(S))


def _slot0_after(neighbours: int, steps) -> dict[str, torch.Tensor]:
    pairs = [_seeded(DropMLP, s) for s in range(neighbours + 1)]
    mb, engine = _fused([m for m, _ in pairs], [st for _, st in pairs])
    for x, y, kw in steps(neighbours):
        engine.train_step(x, y, **kw)
    return mb.slot_state(0)


def test_a_slots_masks_do_not_depend_on_its_neighbours_or_on_masked_steps():
    batches = _batches(STEPS, 10)
    alone = _slot0_after(0, lambda n: [(x, y, {}) for x, y in batches])
    beside_three = _slot0_after(3, lambda n: [(x, y, {}) for x, y in batches])
    gathered = _slot0_after(3, lambda n: [(x, y, {"slots": [0, 2]}) for x, y in batches])
    # Slot 0 steps every time; slot 1 is masked every other step (it computes but must not move).
    masked = _slot0_after(3, lambda n: [(x, y, {"skip": torch.tensor([False, i % 2 == 0, False, False])})
                                        for i, (x, y) in enumerate(batches)])
    for other in (beside_three, gathered, masked):
        for k, v in alone.items():
            assert torch.equal(v, other[k]), k


def test_a_masked_slot_keeps_its_generator_and_a_stepped_one_moves_on():
    pairs = [_seeded(DropMLP, s) for s in range(S)]
    mb, engine = _fused([m for m, _ in pairs], [st for _, st in pairs])
    before = [mb.random.state(s) for s in range(S)]
    x, y = _batches(1, 10)[0]
    engine.train_step(x, y, skip=torch.tensor([False, True, False]))
    assert torch.equal(mb.random.state(1), before[1])
    assert not torch.equal(mb.random.state(0), before[0]) and not torch.equal(mb.random.state(2), before[2])


def test_a_step_that_fails_after_its_forward_leaves_every_generator_as_it_was():
    """A fused step retried after running out of memory draws the same masks again."""
    pairs = [_seeded(DropMLP, s) for s in range(S)]
    mb, engine = _fused([m for m, _ in pairs], [st for _, st in pairs])
    before = [mb.random.state(s) for s in range(S)]
    calls = {"n": 0}

    def flaky(out, y):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory (simulated)")
        return F.cross_entropy(out, y)

    engine.loss_fn = flaky
    x, y = _batches(1, 10)[0]
    with pytest.raises(RuntimeError, match="simulated"):
        engine.train_step(x, y)
    assert all(torch.equal(mb.random.state(s), before[s]) for s in range(S))
    engine.train_step(x, y)
    ref, engine_ref = _fused([m for m, _ in pairs], [st for _, st in pairs])
    engine_ref.train_step(x, y)
    for k, v in ref.slot_state(1).items():
        assert torch.equal(v, mb.slot_state(1)[k]), k


def test_generators_follow_copy_and_resize_and_new_rows_get_seeds_of_their_own():
    r = SlotRandom(3, "cpu")
    r.seed(0, 5)
    r.copy(0, 2)
    assert torch.equal(r.state(2), r.state(0))
    r.resize([2, 1], 5)
    assert torch.equal(r.state(0), torch.Generator().manual_seed(5).get_state())
    states = [r.state(i) for i in range(5)]
    assert len({bytes(s.numpy()) for s in states}) == 5  # the new rows 2..4 draw streams of their own


def test_a_state_of_another_device_gets_one_clear_line():
    r = SlotRandom(2, "cpu")
    with pytest.raises(ValueError, match="does not fit this stack's cpu generators"):
        r.set_state(0, torch.zeros(16, dtype=torch.uint8))


def test_eval_draws_nothing():
    pairs = [_seeded(DropMLP, s) for s in range(S)]
    mb, _ = _fused([m for m, _ in pairs], [st for _, st in pairs])
    before = [mb.random.state(s) for s in range(S)]
    mb.eval()
    mb(torch.randn(4, 10))
    assert all(torch.equal(mb.random.state(s), before[s]) for s in range(S))
    assert not mb.random.drew
    with torch.no_grad():
        assert math.isfinite(float(mb(torch.randn(4, 10)).sum()))


@pytest.mark.parametrize("name", ["mlp_on_vmap", "dropout2d"])
def test_on_vmap_a_slot_with_dropout_trains_like_its_model_alone(name):
    make, features = (DropMLP, 10) if name == "mlp_on_vmap" else (lambda: DropCNN(nn.Dropout2d), 36)
    pairs = [_seeded(make, s) for s in range(S)]
    batches = _batches(STEPS, features)
    refs = [_alone(m, st, batches) for m, st in pairs]
    mb = rmb.ModelBatch([m for m, _ in pairs], direct_path=False)
    for s, (_, st) in enumerate(pairs):
        mb.random.set_state(s, st)
    engine = rmb.FusedEngine(mb, optim.SGD(mb, lr=LR, momentum=0.9), F.cross_entropy)
    assert not mb.uses_direct_path
    for x, y in batches:
        engine.train_step(x, y)
    for s, (ref, end) in enumerate(refs):
        assert _max_rel(mb, s, ref) < 2e-5, (name, s)
        assert torch.equal(mb.random.state(s), end), (name, s)


def test_per_slot_random_off_draws_every_slot_s_masks_at_once_from_the_global_generator():
    pairs = [_seeded(DropMLP, s) for s in range(S)]
    mb = rmb.ModelBatch([m for m, _ in pairs], per_slot_random=False)
    before = [mb.random.state(s) for s in range(S)]
    engine = rmb.FusedEngine(mb, optim.SGD(mb, lr=LR), F.cross_entropy)
    x, y = _batches(1, 10)[0]
    torch.manual_seed(3)
    engine.train_step(x, y)
    g_after = torch.get_rng_state()
    assert all(torch.equal(mb.random.state(s), before[s]) for s in range(S))  # untouched
    torch.manual_seed(3)
    assert not torch.equal(torch.get_rng_state(), g_after)  # the global generator drew the masks
    same = rmb.ModelBatch([copy.deepcopy(pairs[0][0]) for _ in range(S)], per_slot_random=False)
    out = same(x)
    assert not torch.equal(out[0], out[1])  # identical weights: still a mask of its own per slot


def noisy_step(model, batch, config):
    """A user's step that draws: input noise (randn_like), an extra random input (randn), a random mask (rand)."""
    x, y = batch
    x = x + 0.1 * torch.randn_like(x) + 0.05 * torch.randn(x.shape[0], 1)
    keep = (torch.rand(x.shape[0], 1) > 0.2).float()
    return F.cross_entropy(model(x * keep), y)


def test_a_user_step_that_draws_noise_draws_its_model_s_own_numbers():
    _fused_step_trains_like_alone(DropMLP, noisy_step)


def test_a_model_in_parts_draws_per_slot_and_a_masked_slot_keeps_its_generator():
    """A GAN-like model trained in parts: both parts draw noise; a masked slot's generator does not move."""
    torch.manual_seed(0)
    models = [nn.ModuleDict({"a": nn.Linear(10, 4), "b": nn.Linear(10, 4)}) for _ in range(S)]
    mb = rmb.ModelBatch(models)
    parts = {"a": lambda m, batch, c: F.cross_entropy(m["a"](batch[0] + torch.randn_like(batch[0])), batch[1]),
             "b": lambda m, batch, c: F.cross_entropy(m["b"](batch[0] * torch.rand(1)), batch[1])}
    opt = OptimizerSet(mb, {"a": lambda v: optim.SGD(v, lr=LR), "b": lambda v: optim.SGD(v, lr=LR)})
    engine = rmb.FusedEngine(mb, opt, step_fn=parts)
    before = [mb.random.state(s) for s in range(S)]
    x, y = _batches(1, 10)[0]
    engine.train_step(x, y, skip=torch.tensor([False, True, False]))
    assert torch.equal(mb.random.state(1), before[1])
    assert not torch.equal(mb.random.state(0), before[0])


def test_an_evaluation_that_draws_leaves_every_generator_where_it_was():
    pairs = [_seeded(DropMLP, s) for s in range(S)]
    mb = rmb.ModelBatch([m for m, _ in pairs])
    engine = rmb.FusedEngine(mb, optim.SGD(mb, lr=LR), step_fn=noisy_step, eval_fn=lambda m, b, c: {
        "noisy": noisy_step(m, b, c)})
    before = [mb.random.state(s) for s in range(S)]
    x, y = _batches(1, 10)[0]
    first = engine.evaluate(x, y)["noisy"]
    again = engine.evaluate(x, y, slots=[2, 0])["noisy"]  # another set of rows: each slot's value is its own
    assert all(torch.equal(mb.random.state(s), before[s]) for s in range(S))
    assert torch.equal(again, first[[2, 0]])
    assert len(set(first.tolist())) == S


def test_a_direct_run_that_fails_after_drawing_leaves_vmap_the_slots_own_states(monkeypatch):
    """When the direct path fails halfway (after a dropout) and vmap runs the forward again, vmap draws from the
    slots' states, not from where the failed run left its generators."""
    from ray_modelbatch import fast_path
    from ray_modelbatch.errors import FusionWarning

    pairs = [_seeded(DropMLP, s) for s in range(S)]
    x, y = _batches(1, 10)[0]
    ref = rmb.ModelBatch([copy.deepcopy(m) for m, _ in pairs], direct_path=False)
    for s, (_, st) in enumerate(pairs):
        ref.random.set_state(s, st)
    want = ref(x)
    mb = rmb.ModelBatch([m for m, _ in pairs])
    for s, (_, st) in enumerate(pairs):
        mb.random.set_state(s, st)
    real = fast_path._Runner._k_linear

    def second_linear_fails(self, step, *args, **kwargs):
        if step.target == "fc2":
            raise RuntimeError("a kernel that fails at run time")
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(fast_path._Runner, "_k_linear", second_linear_fails)
    with pytest.warns(FusionWarning, match="direct fused path failed"):
        got = mb(x)
    assert torch.equal(got, want)
    assert all(torch.equal(mb.random.state(s), ref.random.state(s)) for s in range(S))


# ------------------------------------------------------------------ every random function of a user's step
class Encoder(nn.Module):
    """An encoder whose 8 outputs a step splits into a 4-wide code and 4 more values, and a decoder of the code."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(10, 8), nn.Linear(4, 4)

    def forward(self, x):
        return self.enc(x)


def _vae(m, batch, config):  # a VAE's reparameterized sample: torch.distributions fills a fresh tensor
    h = m(batch[0])
    z = torch.distributions.Normal(h[:, :4], (0.5 * h[:, 4:]).exp()).rsample()
    return F.cross_entropy(m.dec(z), batch[1])


def _normal_of_tensors(m, batch, config):
    h = m(batch[0])[:, :4]
    return F.cross_entropy(m.dec(h + torch.normal(torch.zeros_like(h), 0.1 + h.detach().abs())), batch[1])


def _fills(m, batch, config):  # in-place fills of tensors that hold a value per slot
    h = m(batch[0])[:, :4]
    e, u = torch.empty_like(h).normal_(), torch.empty_like(h).uniform_(-1, 1)
    keep, ex = torch.empty_like(h).bernoulli_(0.7), torch.empty_like(h).exponential_()
    c, r = torch.empty_like(h).cauchy_().clamp(-3, 3), torch.empty_like(h).random_(0, 3)
    g, ln = torch.empty_like(h).geometric_(0.5), torch.empty_like(h).log_normal_(0.0, 0.1)
    return F.cross_entropy(m.dec(h * keep + 0.1 * e + 0.1 * u + 0.01 * (ex + c + r + g + ln)), batch[1])


def _discrete(m, batch, config):
    h = m(batch[0])
    keep = torch.bernoulli(torch.sigmoid(h[:, :4].detach()))
    pick = torch.multinomial(torch.softmax(h.detach(), -1), 2).float()
    counts = torch.poisson(h.detach().abs()) + torch.binomial(torch.full_like(h, 5.0), torch.sigmoid(h.detach()))
    cat = torch.distributions.Categorical(logits=h.detach()).sample().float()
    extra = 0.01 * (pick.sum() + counts.sum() + cat.sum() + torch.randint_like(h, 1, 3).sum())
    return F.cross_entropy(m.dec(h[:, :4] * keep), batch[1]) + extra


def _gamma_laplace(m, batch, config):
    h = m(batch[0])
    w = torch._sample_dirichlet(h[:, :4].detach().abs() + 0.5)  # (Dirichlet's own autograd.Function has no vmap rule)
    g = torch.distributions.Gamma(h[:, 4:].detach().abs() + 1.0, 1.0).sample()
    lap = torch.distributions.Laplace(h[:, 4:], 1.0).rsample()
    return F.cross_entropy(m.dec(h[:, :4] * w + 0.01 * (g + lap)), batch[1])


def _selu_dropouts(m, batch, config):
    h = F.alpha_dropout(torch.selu(m(batch[0])), 0.2, True)
    h = F.feature_alpha_dropout(h.view(-1, 8, 1, 1), 0.3, True).view(-1, 8)
    return F.cross_entropy(m.dec(h[:, :4]), batch[1])


def _no_generator_argument(m, batch, config):  # they draw from the global generator: run per slot with its own
    h = m(batch[0])
    a = F.gumbel_softmax(h[:, :4], tau=0.5) + F.rrelu(h[:, 4:], training=True)
    q = h.view(2, 8, 8)[:, :, :4]
    att = F.scaled_dot_product_attention(q, q, q, dropout_p=0.3).reshape(16, 4)
    return F.cross_entropy(m.dec(a + att), batch[1])


def _inits(m, batch, config):  # torch.nn.init's fills (some hand themselves to the mode) and generator=None
    h = m(batch[0])[:, :4]
    n, u, k, xa = (torch.empty_like(h) for _ in range(4))
    torch.nn.init.normal_(n, 0.0, 0.1)
    torch.nn.init.uniform_(u, -0.1, 0.1)
    torch.nn.init.kaiming_uniform_(k)
    torch.nn.init.xavier_normal_(xa)
    noise = torch.randn(h.shape, generator=None)
    return F.cross_entropy(m.dec(h + n + u + 0.01 * (k + xa + noise)), batch[1])


def _fractional_pool(m, batch, config):
    h = m(batch[0])
    pooled = F.fractional_max_pool2d(h.view(-1, 2, 2, 2), 2, output_size=(1, 1)).flatten(1)
    return F.cross_entropy(m.dec(h[:, :4] + pooled.mean(1, keepdim=True)), batch[1])


RANDOM_STEPS = {"vae": _vae, "normal_of_tensors": _normal_of_tensors, "fills": _fills, "discrete": _discrete,
                "gamma_laplace": _gamma_laplace, "selu_dropouts": _selu_dropouts,
                "no_generator_argument": _no_generator_argument, "inits": _inits, "fractional_pool": _fractional_pool}


def _step_alone(make, step, s: int, batches) -> tuple[nn.Module, torch.Tensor, nn.Module, torch.Tensor]:
    """Model ``s`` as built (and its generator state then), and the same trained alone with ``step``, and where
    its generator ended."""
    model, state = _seeded(make, s)
    return (model, state, *_alone(model, state, batches, step))


def _fused_step_trains_like_alone(make, step) -> None:
    """S slots of ``make()`` trained fused with ``step`` end as each model trained alone with it, drawing from
    torch's global generator, does: parameters to float rounding, the generator where the model's ended."""
    batches = _batches(STEPS, 10)
    runs = [_step_alone(make, step, s, batches) for s in range(S)]
    mb = rmb.ModelBatch([r[0] for r in runs])
    for s, r in enumerate(runs):
        mb.random.set_state(s, r[1])
    engine = rmb.FusedEngine(mb, optim.SGD(mb, lr=LR, momentum=0.9), step_fn=step)
    for x, y in batches:
        engine.train_step(x, y)
    for s, (_, _, ref, end) in enumerate(runs):
        assert _max_rel(mb, s, ref) < 2e-5, s
        assert torch.equal(mb.random.state(s), end), s


@pytest.mark.parametrize("name", list(RANDOM_STEPS))
def test_every_random_function_in_a_step_draws_the_slot_s_own_numbers(name):
    """Each sampler, fill, distribution and generator-less random function."""
    _fused_step_trains_like_alone(Encoder, RANDOM_STEPS[name])


class RandomLayers(nn.Module):
    """Layers that draw inside a model on vmap: AlphaDropout, RReLU, MultiheadAttention's dropout."""

    def __init__(self):
        super().__init__()
        self.fc, self.drop, self.act = nn.Linear(10, 8), nn.AlphaDropout(0.2), nn.RReLU()
        self.att, self.out = nn.MultiheadAttention(8, 2, dropout=0.3), nn.Linear(8, 4)

    def forward(self, x):
        h = self.act(self.drop(self.fc(x))).view(4, -1, 8)
        return self.out(self.att(h, h, h)[0].reshape(-1, 8))


def test_a_model_whose_layers_draw_trains_like_its_model_alone():
    batches = _batches(STEPS, 10)
    pairs = [_seeded(RandomLayers, s) for s in range(S)]
    refs = [_alone(m, st, batches) for m, st in pairs]
    mb, engine = _fused([m for m, _ in pairs], [st for _, st in pairs])
    for x, y in batches:
        engine.train_step(x, y)
    for s, (ref, end) in enumerate(refs):
        assert _max_rel(mb, s, ref) < 2e-5, s
        assert torch.equal(mb.random.state(s), end), s


def test_a_random_fill_of_a_tensor_made_in_the_step_gets_one_clear_line():
    def fills_its_own(m, batch, config):
        noise = torch.zeros(4)
        noise.normal_()  # one tensor for all slots: it cannot hold each slot's own draw
        return F.cross_entropy(m.dec(m(batch[0])[:, :4] + noise), batch[1])

    mb = rmb.ModelBatch([Encoder() for _ in range(S)])
    engine = rmb.FusedEngine(mb, optim.SGD(mb, lr=LR), step_fn=fills_its_own)
    before = [mb.random.state(s) for s in range(S)]
    with pytest.raises(rmb.FusionError, match=r"fills_its_own.*fills a tensor made inside it.*torch\.randn_like"):
        engine.train_step(*_batches(1, 10)[0])
    assert all(torch.equal(mb.random.state(s), before[s]) for s in range(S))


class _TransposedDropout(nn.Module):
    """Dropout of a non-contiguous activation (batch-first attention's output is a transpose): torch's mask
    follows the tensor's memory order, so a slot's must too."""

    def __init__(self, shared_noise_input=False):
        super().__init__()
        self.fc, self.drop = nn.Linear(8, 8), nn.Dropout(0.3)
        self.shared_noise_input = shared_noise_input

    def forward(self, x):
        h = self.fc(x).transpose(0, 1)
        if self.shared_noise_input:  # a tensor with no slot dimension, dropped out inside the fused call
            h = h + self.drop(torch.ones(h.shape).transpose(0, 1)).transpose(0, 1)
        return self.drop(torch.sin(h)).transpose(0, 1)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "vmap"])
@pytest.mark.parametrize("shared", [False, True], ids=["slot input", "plus an unbatched input"])
def test_dropout_of_a_non_contiguous_activation_draws_the_models_own_mask(direct, shared):
    torch.manual_seed(1)
    model = _TransposedDropout(shared)
    state = torch.get_rng_state()
    mb = rmb.ModelBatch([copy.deepcopy(model), copy.deepcopy(model)], direct_path=direct)
    assert mb.uses_direct_path == direct
    mb.random.set_state(0, state)
    x = torch.randn(4, 6, 8)
    out = mb(x)
    torch.set_rng_state(state)
    torch.testing.assert_close(out[0], model(x), rtol=0, atol=0)
