"""Cross-entropy over wide rows without two logits-sized tensors (ray_modelbatch/wide_cross_entropy.py): torch's
bits, losses and gradients alike, wherever a stack takes it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch import slot_losses
from ray_modelbatch import wide_cross_entropy as wide

VOCAB = 1024  # 4 KB a row: 256 rows of one slot reach MIN_BYTES


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of 7 rows of VOCAB classes (the last one partial), so that every test crosses their borders."""
    monkeypatch.setattr(wide, "PIECE_BYTES", 7 * VOCAB * 4)


@pytest.fixture
def calls(monkeypatch):
    """The logits' shapes the pieced function was called with (so a test sees that the path it checks was
    taken): under vmap each call shows twice, one slot's logits and then every slot's."""
    seen = []
    original = wide._WideRows.apply

    def counted(*args):
        seen.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(wide._WideRows, "apply", counted)
    return seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_row_losses_and_their_gradient_are_torchs_bits(small_pieces, dtype, ignore_index):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(150, VOCAB, generator=g, dtype=dtype) * 4).requires_grad_()
    target = torch.randint(0, VOCAB, (150,), generator=g)
    target[::5] = ignore_index  # ignored rows: no loss, no gradient
    upstream = torch.randn(150, generator=g, dtype=dtype)
    ours = wide.row_losses(logits, target, ignore_index)
    (got,) = torch.autograd.grad(ours, logits, upstream)
    theirs = F.cross_entropy(logits, target, reduction="none", ignore_index=ignore_index)
    (want,) = torch.autograd.grad(theirs, logits, upstream)
    assert torch.equal(ours, theirs)
    assert torch.equal(got, want)
    assert torch.equal(got[::5], torch.zeros_like(got[::5]))


def test_a_second_derivative_is_torchs(small_pieces):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(20, VOCAB, generator=g, requires_grad=True)
    target = torch.randint(0, VOCAB, (20,), generator=g)

    def penalty(fn):
        (grad,) = torch.autograd.grad(fn(logits).sum(), logits, create_graph=True)
        return torch.autograd.grad(grad.square().sum(), logits)[0]

    want = penalty(lambda x: F.cross_entropy(x, target, reduction="none"))
    torch.testing.assert_close(penalty(lambda x: wide.row_losses(x, target)), want, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_mode_under_vmap_is_torchs(calls, reduction):
    """A user's step may take a jvp of its loss (torch.func.jvp) inside the stack's vmap."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 200, VOCAB, generator=g, dtype=torch.float64)
    dx = torch.randn(3, 200, VOCAB, generator=g, dtype=torch.float64)
    t = torch.randint(0, VOCAB, (3, 200), generator=g)
    t[:, ::9] = -100

    def jvp(x, t, d):
        return torch.func.jvp(lambda a: F.cross_entropy(a, t, reduction=reduction), (x,), (d,))

    with wide.batched_cross_entropy():
        got = torch.vmap(jvp)(x, t, dx)
    assert calls
    want = torch.vmap(jvp)(x, t, dx)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_a_target_out_of_range_gets_torchs_error():
    logits = torch.randn(4, VOCAB)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        wide.row_losses(logits, torch.tensor([0, 1, VOCAB, 2]))


def test_what_it_takes():
    rows = wide.MIN_BYTES // (VOCAB * 4)
    target = torch.zeros(rows, dtype=torch.long)
    assert wide.applies(torch.zeros(rows, VOCAB), target)
    assert not wide.applies(torch.zeros(rows - 1, VOCAB), target[1:])  # small: torch's own call
    assert not wide.applies(torch.zeros(rows, VOCAB, dtype=torch.bfloat16), target)
    assert not wide.applies(torch.zeros(rows * 512, 8), torch.zeros(rows * 512, dtype=torch.long))  # short rows
    assert not wide.applies(torch.zeros(rows, VOCAB), torch.zeros(rows, VOCAB))  # probabilities


class TinyLM(nn.Module):
    """Embedding, a hidden layer and a vocabulary head: 32 tokens of VOCAB logits per sequence."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, 16), nn.Linear(16, VOCAB)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


def _lm_loss(reduction):
    def loss(out, y):
        value = F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100, reduction=reduction)
        return value if reduction != "none" else value.mean()
    return loss


def _train(loss_fn, per_slot, monkeypatch=None, steps=3, direct_path=False):
    """Three stacked TinyLMs trained 3 Adam steps on sequences with ignored positions; their parameters."""
    torch.manual_seed(0)
    models = [TinyLM() for _ in range(3)]
    solo = [copy.deepcopy(m) for m in models]
    mb = rmb.ModelBatch(models, direct_path=direct_path)
    engine = rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=[1e-2, 3e-3, 1e-3]), loss_fn)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        shape = (3, 8, 32) if per_slot else (8, 32)
        x = torch.randint(0, VOCAB, shape, generator=g)
        y = torch.where(torch.rand(shape, generator=g) < 0.2, -100, torch.roll(x, -1, -1))
        engine.train_step(x, y, per_slot=per_slot)
    return mb, solo


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("per_slot", [False, True])
def test_a_users_loss_on_vmap_trains_to_the_bits_of_torchs_call(monkeypatch, calls, reduction, per_slot):
    mb, _ = _train(_lm_loss(reduction), per_slot)
    assert (3 * 8 * 32, VOCAB) in calls  # every slot's rows in one call, under the stack's vmap
    assert not wide.active()  # torch's function is back
    monkeypatch.setattr(wide, "applies", lambda *a: False)
    reference, _ = _train(_lm_loss(reduction), per_slot)
    for k, v in mb.params.items():
        assert torch.equal(v, reference.params[k]), k


def test_the_stack_trains_like_each_model_alone_with_torch_optim():
    mb, solo = _train(_lm_loss("mean"), per_slot=True)
    g = torch.Generator().manual_seed(1)
    opts = [torch.optim.Adam(m.parameters(), lr=lr) for m, lr in zip(solo, [1e-2, 3e-3, 1e-3])]
    for _ in range(3):
        x = torch.randint(0, VOCAB, (3, 8, 32), generator=g)
        y = torch.where(torch.rand((3, 8, 32), generator=g) < 0.2, -100, torch.roll(x, -1, -1))
        for i, (m, o) in enumerate(zip(solo, opts)):
            o.zero_grad()
            _lm_loss("mean")(m(x[i]), y[i]).backward()
            o.step()
    for i, m in enumerate(solo):
        for name, v in m.state_dict().items():
            torch.testing.assert_close(mb.slot_state(i)[name], v, atol=1e-5, rtol=0, msg=f"slot {i} {name}")


def test_the_per_slot_loss_of_a_wide_head_is_torchs_bits(calls):
    g = torch.Generator().manual_seed(2)
    out = torch.randn(3, 260, VOCAB, generator=g, requires_grad=True)
    y = torch.randint(0, VOCAB, (3, 260), generator=g)
    y[:, ::7] = -100
    losses = slot_losses.per_slot_loss(F.cross_entropy, out, y, per_slot_targets=True)
    assert calls == [(780, VOCAB)]
    (got,) = torch.autograd.grad(losses.sum(), out)
    want = torch.stack([F.cross_entropy(out[i], y[i]) for i in range(3)])
    (want_grad,) = torch.autograd.grad(want.sum(), out)
    torch.testing.assert_close(losses, want, atol=1e-6, rtol=0)  # the mean's sum may round apart
    assert torch.equal(got, want_grad)


def test_calls_it_does_not_cover_go_to_torch(calls):
    torch.manual_seed(3)
    logits, target = torch.randn(2, 300, VOCAB), torch.randint(0, VOCAB, (2, 300))
    weight = torch.rand(VOCAB)
    with wide.batched_cross_entropy():
        for kwargs in ({"label_smoothing": 0.1}, {"weight": weight}, {"reduction": "none"}):
            got = torch.vmap(lambda x, t: F.cross_entropy(x, t, **kwargs))(logits, target)
            want = torch.stack([wide._TORCH_CROSS_ENTROPY(logits[i], target[i], **kwargs) for i in range(2)])
            torch.testing.assert_close(got, want)
        probabilities = torch.softmax(torch.randn(2, 300, VOCAB), -1)
        torch.vmap(F.cross_entropy)(logits, probabilities)
        F.cross_entropy(logits[0], target[0])  # not batched
    assert calls == [(300, VOCAB), (600, VOCAB)]  # only the plain call on batched logits, reduction="none"


def test_the_block_nests_and_puts_torchs_function_back():
    assert F.cross_entropy is wide._TORCH_CROSS_ENTROPY
    with wide.batched_cross_entropy():
        with wide.batched_cross_entropy():
            assert wide.active()
        assert wide.active()
    assert not wide.active() and F.cross_entropy is wide._TORCH_CROSS_ENTROPY


def test_a_transformers_causal_lm_computing_its_own_loss_takes_it(monkeypatch, calls):
    transformers = pytest.importorskip("transformers")

    def gpt2():
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)

    def run():
        torch.manual_seed(0)
        mb = rmb.ModelBatch([gpt2() for _ in range(2)])
        engine = rmb.FusedEngine(mb, rmb.optim.AdamW(mb, lr=1e-3), step_fn=lambda m, b, c: m(**b).loss)
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            ids = torch.randint(1, VOCAB, (2, 8, 32), generator=g)
            engine.train_step({"input_ids": ids, "labels": ids}, per_slot=True)
        return mb

    mb = run()
    assert (2 * 8 * 32, VOCAB) in calls
    monkeypatch.setattr(wide, "applies", lambda *a: False)
    reference = run()
    for k, v in mb.params.items():
        assert torch.equal(v, reference.params[k]), k
