"""nn.LSTM / nn.GRU / nn.RNN on the direct path (direct_rnn): no vmap, and each slot trains like its model alone.

Every stack here must run its recurrent layers with the direct kernel (the
plan has an "rnn" step and no call falls back to vmap) and match the same
models trained alone with ``torch.optim.Adam`` on the same batches: forward
outputs and every gradient on the first step, parameters after a few steps,
to 1e-5. Outputs, ``h_n`` and ``c_n`` all feed the loss, so each of their
gradients is checked; an initial state computed from the input checks the
gradient of ``hx``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ray_modelbatch as rmb
from ray_modelbatch.errors import FusionError

S = 3
IN, HID, CLASSES = 5, 6, 3


@pytest.fixture(autouse=True, params=["per_slot", "batched"])
def rnn_kernel(request, monkeypatch):
    """Every test with both kernels of the direct path: torch's own per slot (per_slot_rnn) and the batched one
    (direct_rnn); a stack picks one by measuring them (``RAY_MODELBATCH_RNN_KERNEL`` fixes the choice)."""
    monkeypatch.setenv("RAY_MODELBATCH_RNN_KERNEL", request.param)
    return request.param


class Classifier(nn.Module):
    """A recurrent layer, its last output, ``h_n`` (and ``c_n``) -> Linear; optionally an initial state made
    from the first time step (so its gradient flows back into ``init``)."""

    def __init__(self, kind: str, with_hx: bool = False, **kw):
        super().__init__()
        self.rnn = getattr(nn, kind)(IN, HID, **kw)
        self.lstm, self.with_hx = kind == "LSTM", with_hx
        self.states = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
        self.init = nn.Linear(IN, HID)
        self.head = nn.Linear(HID * (2 if kw.get("bidirectional") else 1), CLASSES)
        self.state_head = nn.Linear(self.states * HID * (2 if self.lstm else 1), CLASSES)  # every h_n (c_n) row

    def forward(self, x):
        first = x[:, 0] if self.rnn.batch_first else x[0]
        if self.with_hx:
            h0 = torch.stack([torch.tanh(self.init(first))] * self.states)
            out, state = self.rnn(x, (h0, h0 * 0.5) if self.lstm else h0)
        else:
            out, state = self.rnn(x)
        last = out[:, -1] if self.rnn.batch_first else out[-1]
        states = torch.cat([state[0], state[1]], -1) if self.lstm else state  # [layers * directions, B, H (+ H)]
        return self.head(last) + self.state_head(states.transpose(0, 1).flatten(1))


def _pick(v, i, per_slot):
    return v[i] if per_slot else v


def _check_trains_like_solo(make, x, y, per_slot: bool, steps: int = 3, lr: float = 1e-2,
                            args: tuple = ()) -> rmb.ModelBatch:
    """Fuse S models from ``make`` and train them next to solo copies with torch.optim.Adam (``args``: further
    inputs of the forward, per slot like ``x`` with ``per_slot``)."""
    torch.manual_seed(0)
    models = [make() for _ in range(S)]
    solo = [copy.deepcopy(m) for m in models]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    assert mb.uses_direct_path and "rnn" in mb._plan().kinds().values()
    opt = rmb.optim.Adam(mb, lr=lr)
    opts = [torch.optim.Adam(m.parameters(), lr=lr) for m in solo]
    for step in range(steps):
        mb.zero_grad()
        losses, out = mb.forward_loss(x, y, F.cross_entropy, *args, per_slot=per_slot)
        losses.sum().backward()
        for i, (m, o) in enumerate(zip(solo, opts)):
            o.zero_grad()
            ref = m(_pick(x, i, per_slot), *(_pick(a, i, per_slot) for a in args))
            F.cross_entropy(ref, _pick(y, i, per_slot)).backward()
            if step == 0:
                torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
                for name, p in m.named_parameters():
                    if p.grad is not None:
                        torch.testing.assert_close(mb.params[name].grad[i], p.grad, rtol=1e-5, atol=1e-5,
                                                   msg=f"slot {i} grad of {name}")
            o.step()
        opt.step()
    assert not mb._slow_keys  # every call took the direct path
    for i, m in enumerate(solo):
        got = mb.slot_state(i)
        for k, v in m.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=f"slot {i} {k}")
    return mb


def _batch(batch_first: bool, per_slot: bool, steps: int = 7, batch: int = 4):
    shape = (batch, steps, IN) if batch_first else (steps, batch, IN)
    x = torch.randn((S, *shape) if per_slot else shape)
    y = torch.randint(0, CLASSES, (S, batch) if per_slot else (batch,))
    return x, y


CASES = [
    ("LSTM", True, dict(num_layers=2, bidirectional=True)),  # time-major input, given (h0, c0)
    ("LSTM", False, dict(batch_first=True, bias=False)),
    ("GRU", True, dict(num_layers=2, bidirectional=True, batch_first=True)),
    ("GRU", False, dict(bias=False)),
    ("RNN", True, dict(num_layers=2, nonlinearity="relu", batch_first=True)),
    ("RNN", False, dict(bidirectional=True)),
]


@pytest.mark.parametrize("per_slot", [False, True], ids=["shared-batch", "per-slot-batches"])
@pytest.mark.parametrize("kind, with_hx, kw", CASES,
                         ids=[f"{k}-hx{h}-{'-'.join(f'{a}={b}' for a, b in kw.items())}" for k, h, kw in CASES])
def test_a_recurrent_stack_trains_like_each_model_alone(kind, with_hx, kw, per_slot):
    x, y = _batch(kw.get("batch_first", False), per_slot)
    _check_trains_like_solo(lambda: Classifier(kind, with_hx, **kw), x, y, per_slot)


@pytest.mark.parametrize("as_sigmoid", [True, False], ids=["tanh-as-sigmoid", "torch-tanh"])
@pytest.mark.parametrize("kind, kw", [("LSTM", {}), ("GRU", {}), ("RNN", dict(bidirectional=True))])
def test_either_tanh_of_the_batched_kernel_trains_like_each_model_alone(kind, kw, as_sigmoid, monkeypatch,
                                                                       rnn_kernel):
    """The batched kernel's tanh is ``2 sigmoid(2x) - 1`` where torch's kernels are AVX2 ones, torch's own
    where they are AVX-512 ones: both forms train a slot as its model alone, whichever this CPU has."""
    from ray_modelbatch import direct_rnn

    if rnn_kernel == "per_slot":
        pytest.skip("torch's own kernel per slot computes its tanh itself")

    monkeypatch.setattr(direct_rnn, "_tanh_as_sigmoid", lambda: as_sigmoid)
    x = torch.randn(64, 8)
    out = torch.empty_like(x)
    direct_rnn._tanh(x, out)
    torch.testing.assert_close(out, torch.tanh(x), rtol=0, atol=3e-7)
    x, y = _batch(False, False)
    _check_trains_like_solo(lambda: Classifier(kind, False, **kw), x, y, False)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_eval_mode_outputs_match_the_models_alone(kind):
    torch.manual_seed(0)
    models = [Classifier(kind, True, num_layers=2, bidirectional=True, dropout=0.3) for _ in range(S)]
    for m in models:
        m.eval()
    mb = rmb.ModelBatch(copy.deepcopy(models)).eval()
    assert mb.uses_direct_path
    x, _ = _batch(False, per_slot=True)
    with torch.no_grad():
        out = mb(x, per_slot=True)
        for i, m in enumerate(models):
            torch.testing.assert_close(out[i], m(x[i]), rtol=1e-5, atol=1e-5)
    assert not mb._slow_keys


def test_the_fused_engine_step_trains_like_torch_optim():
    """FusedEngine writes the input projections' gradients straight into the flat buffer (GradTarget)."""
    torch.manual_seed(0)
    models = [Classifier("LSTM", num_layers=2, batch_first=True) for _ in range(S)]
    solo = copy.deepcopy(models)
    mb = rmb.ModelBatch(models)
    engine = rmb.FusedEngine(mb, rmb.optim.Adam(mb, lr=1e-2), F.cross_entropy)
    batches = [_batch(True, per_slot=False) for _ in range(3)]
    for x, y in batches:
        engine.train_step(x, y)
    assert mb.uses_direct_path and not mb._slow_keys
    for i, m in enumerate(solo):
        opt = torch.optim.Adam(m.parameters(), lr=1e-2)
        for x, y in batches:
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        got = mb.slot_state(i)
        for k, v in m.state_dict().items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=f"slot {i} {k}")


class Unbatched(nn.Module):
    """A GRU on one sequence ``[T, I]`` (no batch dimension) with an initial state ``[layers, H]``."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(IN, HID, num_layers=2)
        self.init, self.head = nn.Linear(IN, HID), nn.Linear(HID, CLASSES)

    def forward(self, x):
        out, h_n = self.rnn(x, torch.stack([torch.tanh(self.init(x[0]))] * 2))
        return self.head(out + h_n[-1])


def test_an_unbatched_sequence_with_an_initial_state():
    x, y = torch.randn(7, IN), torch.randint(0, CLASSES, (7,))
    _check_trains_like_solo(Unbatched, x, y, per_slot=False)


class LastStepHead(nn.Module):
    """A one-directional recurrent layer read as ``read`` says: its last step by one of the ways scripts
    write it, with or without the other outputs, or only its ``c_n`` (an LSTM's)."""

    def __init__(self, kind: str, read: str, unbatched: bool, **kw):
        super().__init__()
        self.rnn = getattr(nn, kind)(IN, HID, **kw)
        self.read, self.head = read, nn.Linear(HID, CLASSES)
        self.first = self.rnn.batch_first and not unbatched  # the time steps' dimension: 1, else 0

    def forward(self, x):
        out, state = self.rnn(x)
        first = self.first
        if self.read == "minus-one":
            h = out[:, -1] if first else out[-1]
        elif self.read == "count-and-rest":
            h = out[:, out.shape[1] - 1, :] if first else out[out.shape[0] - 1, ...]
        elif self.read == "and-the-mean":
            h = (out[:, -1] if first else out[-1]) + out.mean(-2 if first else 0)
        elif self.read == "one-before":
            h = out[:, -2] if first else out[-2]
        else:  # "cell-only": nothing but c_n reaches the loss
            h = state[1][-1]
        return self.head(h)


LAST_STEP_CASES = [
    ("LSTM", "minus-one", dict(batch_first=True), True),
    ("LSTM", "count-and-rest", dict(num_layers=2), True),
    ("LSTM", "and-the-mean", dict(batch_first=True), False),
    ("LSTM", "one-before", dict(batch_first=True), False),
    ("LSTM", "cell-only", {}, True),
    ("GRU", "minus-one", dict(batch_first=True, num_layers=2), True),
    ("GRU", "count-and-rest", {}, True),
    ("GRU", "and-the-mean", {}, False),
    ("RNN", "minus-one", dict(batch_first=True), True),
]


@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("kind, read, kw, alone", LAST_STEP_CASES,
                         ids=[f"{k}-{r}-{'-'.join(f'{a}={b}' for a, b in kw.items())}"
                              for k, r, kw, _ in LAST_STEP_CASES])
def test_the_last_step_read_apart_trains_like_each_model_alone(kind, read, kw, alone, unbatched, rnn_kernel,
                                                              monkeypatch):
    """``out[:, -1]`` (and its other spellings) of a one-directional layer is the layer's last output taken
    apart (direct_rnn.SequenceAct): back-propagation starts from its gradient alone, with no zero tensor the
    size of every output, where nothing else of the last layer's outputs is used; ``out[:, -2]`` and the
    outputs used whole keep the outputs' gradient."""
    from ray_modelbatch import direct_rnn

    seen = []
    real = direct_rnn._last_gradient
    monkeypatch.setattr(direct_rnn, "_last_gradient", lambda dy, *a: seen.append(dy is None) or real(dy, *a))
    if unbatched:
        kw = {k: v for k, v in kw.items() if k != "batch_first"}
        x, y = torch.randn(7, IN), torch.randint(0, CLASSES, (1,))
        loss = lambda out, t: F.cross_entropy(out.unsqueeze(0), t)  # noqa: E731 - one sequence, one class
    else:
        x, y = _batch(kw.get("batch_first", False), per_slot=False)
        loss = F.cross_entropy
    torch.manual_seed(0)
    models = [LastStepHead(kind, read, unbatched, **kw) for _ in range(S)]
    solo = [copy.deepcopy(m) for m in models]
    mb = rmb.ModelBatch([copy.deepcopy(m) for m in models])
    assert mb.uses_direct_path
    opt, opts = rmb.optim.Adam(mb, lr=1e-2), [torch.optim.Adam(m.parameters(), lr=1e-2) for m in solo]
    for _ in range(3):
        mb.zero_grad()
        losses, _ = mb.forward_loss(x, y, loss)
        losses.sum().backward()
        opt.step()
        for m, o in zip(solo, opts):
            o.zero_grad()
            loss(m(x), y).backward()
            o.step()
    assert not mb._slow_keys
    for i, m in enumerate(solo):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(mb.slot_state(i)[k], v, rtol=1e-5, atol=1e-5, msg=f"slot {i} {k}")
    if rnn_kernel == "batched":  # the last layer's outputs got no gradient of their own where read apart
        assert seen and seen[0] == alone, seen


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_dropout_between_layers_draws_a_mask_per_slot(kind):
    """Every slot holds the same weights and reads the same batch: only dropout can tell them apart."""
    torch.manual_seed(0)
    model = Classifier(kind, num_layers=2, dropout=0.5)
    mb = rmb.ModelBatch([copy.deepcopy(model) for _ in range(4)])
    x, _ = _batch(False, per_slot=False)
    mb.train()
    with torch.no_grad():
        out = mb(x)
    assert mb.uses_direct_path and not mb._slow_keys
    for i in range(1, 4):
        assert not torch.allclose(out[0], out[i]), f"slots 0 and {i} drew the same dropout mask"
    mb.eval()
    with torch.no_grad():
        out = mb(x)
    assert mb.uses_direct_path and not mb._slow_keys
    for i in range(1, 4):
        torch.testing.assert_close(out[0], out[i])  # no dropout in eval mode
    torch.testing.assert_close(out[0], model.eval()(x), rtol=1e-5, atol=1e-5)


class GivenState(nn.Module):
    """An initial state passed in as inputs of the forward: shared by every slot, or per slot."""

    def __init__(self, kind: str):
        super().__init__()
        self.rnn = getattr(nn, kind)(IN, HID, num_layers=2, bidirectional=True)
        self.head, self.lstm = nn.Linear(2 * HID, CLASSES), kind == "LSTM"

    def forward(self, x, h0, c0):
        out, _ = self.rnn(x, (h0, c0) if self.lstm else h0)
        return self.head(out[-1])


@pytest.mark.parametrize("per_slot", [False, True], ids=["shared-state", "per-slot-state"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_an_initial_state_given_as_an_input(kind, per_slot):
    x, y = _batch(False, per_slot)
    lead = (S,) if per_slot else ()
    h0, c0 = torch.randn(*lead, 4, 4, HID), torch.randn(*lead, 4, 4, HID)
    _check_trains_like_solo(lambda: GivenState(kind), x, y, per_slot, args=(h0, c0))


def test_recurrent_plans_are_not_gather_exact():
    """Elementwise kernels split their loops by size, so a subset of the slots can round differently
    (measured: LSTM and GRU of hidden 6 or 33 differ in the last bit); slot groups must not gather."""
    mb = rmb.ModelBatch([Classifier("LSTM") for _ in range(2)])
    assert mb.uses_direct_path and not mb.gather_exact


def test_proj_size_is_refused_with_a_clear_error():
    with pytest.raises(FusionError, match="proj_size"):
        rmb.ModelBatch([nn.LSTM(IN, HID, proj_size=2) for _ in range(2)])


def test_a_packed_sequence_is_refused_with_a_clear_error():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head = nn.LSTM(IN, HID, batch_first=True), nn.Linear(HID, CLASSES)

        def forward(self, x, lengths):
            packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, (h, _) = self.rnn(packed)
            return self.head(h[-1])

    mb = rmb.ModelBatch([Packed() for _ in range(2)])
    with pytest.raises(FusionError, match="PackedSequence"):
        mb(torch.randn(4, 5, IN), torch.tensor([5, 3, 2, 1]))


class Bare(nn.Module):
    """The recurrent layer's own outputs, nothing after it (so only its kernel decides the bits)."""

    def __init__(self, kind: str, **kw):
        super().__init__()
        self.rnn, self.lstm = getattr(nn, kind)(IN, HID, **kw), kind == "LSTM"

    def forward(self, x, h0):  # one tensor out (the direct path's contract): every output and state in it
        out, state = self.rnn(x, (h0, h0 * 0.5) if self.lstm else h0)
        states = torch.cat(state, -1) if self.lstm else state  # [layers * dirs, B, H (+ H)]
        return torch.cat([out.flatten(), states.flatten()])


@pytest.mark.parametrize("kind, kw", [("LSTM", dict(num_layers=2, bidirectional=True, dropout=0.3)),
                                      ("LSTM", dict(batch_first=True, bias=False)),
                                      ("GRU", dict(num_layers=2, dropout=0.3)), ("RNN", dict(nonlinearity="relu"))])
def test_torch_s_kernel_per_slot_computes_each_model_alone_bit_for_bit(kind, kw, rnn_kernel):
    """Outputs, states and gradients equal the model's own, dropout between layers included (each slot draws
    from its own generator, seeded as its model's global one)."""
    if rnn_kernel != "per_slot":
        pytest.skip("the batched kernel matches to float rounding (the tests above)")
    from ray_modelbatch.slot_random import global_state

    models, states = [], []
    for i in range(S):
        torch.manual_seed(10 + i)
        models.append(Bare(kind, **kw))
        states.append(global_state("cpu"))
    mb = rmb.ModelBatch(copy.deepcopy(models))
    for i, st in enumerate(states):
        mb.random.set_state(i, st)
    x, _ = _batch(kw.get("batch_first", False), per_slot=True)
    layers = kw.get("num_layers", 1) * (2 if kw.get("bidirectional") else 1)
    h0 = torch.randn(S, layers, 4, HID, requires_grad=True)
    assert mb.uses_direct_path
    out = mb(x, h0, per_slot=True)
    out.pow(2).sum().backward()
    assert not mb._slow_keys
    for i, m in enumerate(models):
        torch.set_rng_state(states[i])
        h = h0.detach()[i].clone().requires_grad_(True)
        ref = m(x[i], h)
        ref.pow(2).sum().backward()
        assert torch.equal(out[i], ref), (kind, i)
        assert torch.equal(h0.grad[i], h.grad), (kind, i)
        for name, p in m.named_parameters():
            assert torch.equal(mb.params[name].grad[i], p.grad), (kind, i, name)


def test_the_faster_kernel_is_measured_once_per_shape_and_kept(monkeypatch, rnn_kernel):
    from ray_modelbatch import per_slot_rnn

    monkeypatch.delenv("RAY_MODELBATCH_RNN_KERNEL")
    monkeypatch.setattr(per_slot_rnn, "_CHOICES", {})
    calls = []
    real = per_slot_rnn._measure
    monkeypatch.setattr(per_slot_rnn, "_measure", lambda *a: calls.append(a[2]) or real(*a))
    mb = rmb.ModelBatch([Classifier("LSTM") for _ in range(S)])
    x, _ = _batch(False, per_slot=False)
    for _ in range(3):
        with torch.no_grad():  # an evaluation first: the measurement still runs backward
            mb(x)
    assert calls == [per_slot_rnn.MEASURED_SLOTS[0]]  # once, as a small stack
    [(key, take)] = per_slot_rnn._CHOICES.items()
    assert key[0] == "LSTM" and key[6] == 7 and isinstance(take, bool)  # an LSTM over 7 steps
    mb.eval()
    with torch.no_grad():
        mb(torch.randn(7, 9, IN))  # another batch size, in evaluation: the same choice
    assert len(calls) == 1
    monkeypatch.setattr(per_slot_rnn, "MARGIN", 1e9)  # the batched kernel would have to be a billion times faster
    assert per_slot_rnn._measure(*per_slot_rnn_args(mb)) is True
    monkeypatch.setattr(per_slot_rnn, "MARGIN", 1e-9)  # ... or may be a billion times slower
    assert per_slot_rnn._measure(*per_slot_rnn_args(mb)) is False


def per_slot_rnn_args(mb):
    from ray_modelbatch import direct_rnn

    return mb._template.rnn, IN, 4, 7, 4, torch.float32, direct_rnn._batched
