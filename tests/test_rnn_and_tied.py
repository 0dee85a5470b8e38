"""LSTM/GRU/RNN stacks, and loops over their cells, train like each model alone; tied weights stay tied (issue 13, items 2-3)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_modelbatch import FusedEngine, ModelBatch, optim
from ray_modelbatch.unrolled_rnn import UnrolledRNN, UnrolledRNNCell

S, STEPS = 3, 5


class Tagger(nn.Module):
    """A sequence classifier around one recurrent layer."""

    def __init__(self, kind: str, **kw):
        super().__init__()
        self.rnn = getattr(nn, kind)(6, 8, **kw)
        width = 8 * (2 if kw.get("bidirectional") else 1)
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1] if self.rnn.batch_first else out[-1])


CASES = [
    ("LSTM", dict(num_layers=2, batch_first=True, bidirectional=True)),
    ("LSTM", dict(num_layers=1)),
    ("GRU", dict(num_layers=2, batch_first=True)),
    ("GRU", dict(bidirectional=True, bias=False)),
    ("RNN", dict(num_layers=2, nonlinearity="relu", batch_first=True)),
]


def trains_like_each_model_alone(make, shape: tuple, warnings_are_errors: bool = False) -> ModelBatch:
    """S models from ``make()`` fused with per-slot Adam rates and per-slot batches of ``shape`` (after the slot
    dimension), against each trained alone with torch.optim.Adam: every parameter equal to float rounding."""
    torch.manual_seed(0)
    models = [make() for _ in range(S)]
    solo = [copy.deepcopy(m) for m in models]
    mb = ModelBatch(models)
    lrs = [1e-2, 3e-3, 1e-3]
    engine = FusedEngine(mb, optim.Adam(mb, lr=lrs), F.cross_entropy)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(S, *shape, generator=g) for _ in range(STEPS)]
    ys = [torch.randint(0, 3, (S, 4), generator=g) for _ in range(STEPS)]
    with warnings.catch_warnings():
        if warnings_are_errors:
            warnings.simplefilter("error")
        for x, y in zip(xs, ys):
            engine.train_step(x, y, per_slot=True)
    for i in range(S):
        opt = torch.optim.Adam(solo[i].parameters(), lr=lrs[i])
        for x, y in zip(xs, ys):
            opt.zero_grad()
            F.cross_entropy(solo[i](x[i]), y[i]).backward()
            opt.step()
        got = mb.slot_module(i, make())
        for (name, a), b in zip(got.named_parameters(), solo[i].parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"slot {i} {name}")
    return mb


@pytest.mark.parametrize("kind, kw", CASES, ids=[f"{k}-{'-'.join(map(str, v.items()))}" for k, v in CASES])
def test_a_recurrent_stack_trains_like_each_model_alone(kind, kw):
    trains_like_each_model_alone(lambda: Tagger(kind, **kw), (4, 7, 6) if kw.get("batch_first") else (7, 4, 6))


def test_unrolled_matches_torch_outputs_and_states_with_initial_state():
    torch.manual_seed(0)
    lstm = nn.LSTM(5, 7, num_layers=2, bidirectional=True)
    x = torch.randn(6, 3, 5)
    h0, c0 = torch.randn(4, 3, 7), torch.randn(4, 3, 7)
    want = lstm(x, (h0, c0))
    got = UnrolledRNN(lstm)(x, (h0, c0))
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1][0], want[1][0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1][1], want[1][1], atol=1e-6, rtol=1e-5)
    gru = nn.GRU(5, 7)
    torch.testing.assert_close(UnrolledRNN(gru)(x[:, 0])[0], gru(x[:, 0])[0], atol=1e-6, rtol=1e-5)  # unbatched


class TiedLM(nn.Module):
    """An LM whose output layer shares the embedding's weight (GPT-style)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


def _lm_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def test_tied_weights_stay_tied_and_train_like_the_model_alone():
    torch.manual_seed(0)
    models = [TiedLM() for _ in range(S)]
    solo = [copy.deepcopy(m) for m in models]
    mb = ModelBatch(models)
    assert "head.weight" not in mb.params  # stacked once, under its first name
    x, y = torch.randint(0, 20, (5, 6)), torch.randint(0, 20, (5, 6))
    with torch.no_grad():
        out = mb(x)
        for i in range(S):
            torch.testing.assert_close(out[i], solo[i](x), atol=1e-6, rtol=1e-6)
    engine = FusedEngine(mb, optim.Adam(mb, lr=1e-2), _lm_loss)
    for _ in range(STEPS):
        engine.train_step(x, y)
    for i in range(S):
        opt = torch.optim.Adam(solo[i].parameters(), lr=1e-2)
        for _ in range(STEPS):
            opt.zero_grad()
            _lm_loss(solo[i](x), y).backward()
            opt.step()
        got = mb.slot_module(i, TiedLM())
        assert got.head.weight is got.emb.weight
        for (name, a), b in zip(got.named_parameters(), solo[i].parameters()):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"slot {i} {name}")


def test_a_hook_on_a_recurrent_layer_runs_on_its_unrolled_stand_in():
    """The stack's copy replaces an LSTM by an UnrolledRNN; a forward hook the user put on the LSTM must still
    run (it changes the output here)."""
    torch.manual_seed(0)
    models = [Tagger("LSTM", batch_first=True) for _ in range(S)]
    for m in models:
        m.rnn.register_forward_hook(lambda mod, args, out: (out[0] * 2, out[1]))
    mb = ModelBatch([copy.deepcopy(m) for m in models])
    x = torch.randn(4, 5, 6)
    out = mb(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x))


class CellLoop(nn.Module):
    """A recurrence written by hand around a cell, as many scripts write it: the state made in forward (or the
    cell's own zeros), one cell call per time step of a loop over the input's length."""

    def __init__(self, kind: str, **kw):
        super().__init__()
        self.kind, self.cell = kind, getattr(nn, kind)(6, 8, **kw)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        state = None
        if self.kind == "LSTMCell":
            state = (torch.zeros(x.size(0), 8), torch.zeros(x.size(0), 8))
        for t in range(x.size(1)):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if self.kind == "LSTMCell" else state)


CELL_CASES = [("LSTMCell", {}), ("LSTMCell", dict(bias=False)), ("GRUCell", {}), ("RNNCell", {}),
              ("RNNCell", dict(nonlinearity="relu"))]


@pytest.mark.parametrize("kind, kw", CELL_CASES, ids=[f"{k}-{'-'.join(map(str, v.items()))}" for k, v in CELL_CASES])
def test_a_hand_unrolled_cell_trains_like_each_model_alone(kind, kw):
    """aten::lstm_cell has no vmap batching rule (a stack of LSTMCell loops failed outright) and GRU/RNN cells
    ran once per slot; the stack's copy computes each cell from plain ops, with the cell's own parameters."""
    mb = trains_like_each_model_alone(lambda: CellLoop(kind, **kw), (4, 5, 6),
                                      warnings_are_errors=True)  # no "performance drop": no per-slot loop
    assert [n for n, _ in mb.named_parameters()] == [n for n, _ in CellLoop(kind, **kw).named_parameters()]


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
def test_an_unrolled_cell_gives_torchs_values_batched_unbatched_and_from_a_state(kind):
    torch.manual_seed(0)
    cell = getattr(nn, kind)(5, 7)
    stand_in = UnrolledRNNCell(cell)
    x = torch.randn(3, 5)
    state = (torch.randn(3, 7), torch.randn(3, 7)) if kind == "LSTMCell" else torch.randn(3, 7)
    one = (state[0][0], state[1][0]) if kind == "LSTMCell" else state[0]
    for args in ((x,), (x, state), (x[0],), (x[0], one)):
        torch.testing.assert_close(stand_in(*args), cell(*args), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="1D or 2D"):
        stand_in(torch.randn(2, 3, 5))
