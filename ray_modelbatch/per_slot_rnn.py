"""Recurrent layers as torch's own kernel once per slot, where that beats the batched one on this machine.

:mod:`.direct_rnn` runs every slot's LSTM, GRU or RNN layer as one batched
GEMM per time step, with the gate math and back-propagation through time
written out in Python. Its cost is per time step; torch's CPU kernel for one
model (oneDNN's fused LSTM, or ATen's RNN loop in C++) is per model. On an
AVX-512 Xeon, one torch thread, ``fused forward + backward`` of the layer per
slot against a loop of ``nn.LSTM`` calls (``/tmp`` script, median of 17):

=====================  ============  ==========  ===========
layer, T steps, batch  per slot: n=1  n=4         n=16 (32, 64)
=====================  ============  ==========  ===========
LSTM(16, 64), 64, 64   1.70x slower  1.26x       1.16x (1.24x, 1.19x)
LSTM(16, 32), 64, 64   2.44x         1.21x       1.03x
LSTM(32, 64), 16, 64   1.47x         1.08x       1.00x (1.03x, 1.02x)
LSTM(16, 64), 64, 8    3.88x         1.76x       1.42x
=====================  ============  ==========  ===========

On that machine the batched kernel never won, while on an AVX2 AMD EPYC it
trained at 1.25-2x a loop of the models (see :mod:`.direct_rnn`). So the
choice is measured: the first time a host runs a layer of a given shape and
sequence length, both ways run forward and backward on random data at the
call's batch size for 4 slots, or 16 for a stack of :data:`LARGE_STACK` or
more (three timed rounds each, the median kept), and the batched kernel is
taken only where it is at least :data:`MARGIN` times faster. The choice holds
for every later call of that layer, length and stack size in the process
(training and evaluation): one measurement of 0.1-1 s per layer shape.
``benchmarks/fused_step.py --models lstm,gru`` (``LSTM/GRU(32, 64)`` over 16
steps, batch 64) on the same Xeon shows the other side: there the batched
kernel is the faster one (LSTM 43.9 against 53.8 ms per fused step at 32
slots, GRU 49.3 against 118 ms), so a host takes it. Where this module runs the layer, each slot calls
torch's own kernel with its own weights, initial state and (for dropout
between layers) its own generator, so it computes exactly what its model
alone computes, bit for bit.

``RAY_MODELBATCH_RNN_KERNEL=per_slot`` or ``=batched`` fixes the choice (for
tests and benchmarks).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from torch import nn

from .direct_kernels import SHARED, SLOT, Act

logger = logging.getLogger(__name__)

MARGIN = 1.2  # how much faster the batched kernel must be to be taken over torch's own (exact as alone)
LARGE_STACK = 8  # stacks of this many slots or more are measured apart: the batched kernel gains with the count
MEASURED_SLOTS = (4, 16)  # slots of the measurement for a smaller and a larger stack
_VF_RNN = {"LSTM": torch._VF.lstm, "GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh,
           "RNN_RELU": torch._VF.rnn_relu}
_CHOICES: dict[tuple, bool] = {}  # layer shape and steps -> whether torch's kernel per slot is taken


def applies(runner: Any, name: str, mod: nn.Module, input: Act, batched: Any) -> bool:  # noqa: A002 - torch's name
    """Whether :func:`rnn` runs this call: a CPU stack, a batched ``[B, T, I]``/``[T, B, I]`` input, and
    torch's kernel measured faster for this shape (``batched(runner, name, mod, input, hx)`` runs the other
    way, for the measurement)."""
    if input.t.device.type != "cpu" or len(input.sample_shape(runner.n)) != 3:
        return False
    forced = os.environ.get("RAY_MODELBATCH_RNN_KERNEL")
    if forced in ("per_slot", "batched"):
        return forced == "per_slot"
    shape = input.sample_shape(runner.n)
    steps, batch = (shape[1], shape[0]) if mod.batch_first else (shape[0], shape[1])
    inputs = runner.params[f"{name}.weight_ih_l0"].shape[2]
    slots = MEASURED_SLOTS[runner.n >= LARGE_STACK]
    key = (mod.mode, inputs, mod.hidden_size, mod.num_layers, mod.bias, mod.bidirectional, steps, input.t.dtype, slots)
    if key not in _CHOICES:  # (a first call may come in an evaluation: the measurement trains either way)
        with torch.inference_mode(False), torch.enable_grad():
            _CHOICES[key] = _measure(mod, inputs, slots, steps, batch, input.t.dtype, batched)
    return _CHOICES[key]


def choices() -> dict[str, str]:
    """The kernel this process took for each recurrent layer shape it measured, e.g.
    ``{"LSTM(16, 64) over 64 steps, 4 slots": "per slot"}`` (``host_stats()`` shows them)."""
    return {f"{k[0]}({k[1]}, {k[2]}){f' x{k[3]}' if k[3] > 1 else ''}{' bidirectional' if k[5] else ''} over {k[6]} "
            f"steps, {k[8]} slots": "per slot" if take else "batched" for k, take in _CHOICES.items()}


def rnn(runner: Any, name: str, mod: nn.Module, input: Act, hx: Any) -> tuple:  # noqa: A002 - torch's name
    """``mod(input, hx)`` of every slot, each through torch's kernel with the slot's own weights; results in the
    slot layout, as :func:`.direct_rnn.rnn` gives them."""
    n, dirs = runner.n, 2 if mod.bidirectional else 1
    x = input.t if input.layout == SHARED else runner.slot(input)
    shape = input.sample_shape(n)
    batch = shape[0] if mod.batch_first else shape[1]
    lstm = mod.mode == "LSTM"
    states = _states(runner, hx, lstm)
    names = _weight_names(name, mod)
    # unbind, not x[i]: its backward stacks the slots' gradients in one op (n selects would each write a
    # zero tensor of the whole stack)
    weights = list(zip(*[runner.params[w].unbind(0) for w in names]))
    xs = None if input.layout == SHARED else x.unbind(0)
    states = None if states is None else [s.unbind(0) for s in states]
    zeros = torch.zeros(mod.num_layers * dirs, batch, mod.hidden_size, dtype=x.dtype, device=x.device)
    dropout = float(mod.dropout) if mod.training else 0.0

    def one(i: int) -> tuple:
        h0 = states[0][i] if states else zeros
        hxi = (h0, states[1][i] if states else zeros) if lstm else h0
        return _VF_RNN[mod.mode](x if xs is None else xs[i], hxi, list(weights[i]), mod.bias, mod.num_layers,
                                 dropout, mod.training, mod.bidirectional, mod.batch_first)  # (out, h_n[, c_n])

    if dropout > 0 and mod.num_layers > 1 and runner.random is not None:  # draws: each slot from its generator
        rows = runner.random.each(lambda i: one(i), list(range(n)))
    else:
        rows = [one(i) for i in range(n)]
    out = torch.stack([r[0] for r in rows])
    h_n = Act(torch.stack([r[1] for r in rows]), SLOT)
    state = (h_n, Act(torch.stack([r[2] for r in rows]), SLOT)) if lstm else h_n
    return Act(out, SLOT), state


def _states(runner: Any, hx: Any, lstm: bool) -> tuple[torch.Tensor, ...] | None:
    """``hx`` as slot-first ``[n, layers * dirs, B, H]`` tensors (``(h0,)`` or ``(h0, c0)``); None if not given."""
    if hx is None:
        return None
    parts = tuple(hx) if lstm else (hx,)
    return tuple(runner.slot(p) for p in parts)


def _weight_names(name: str, mod: nn.Module) -> list[str]:
    """The stack's parameter names of ``mod`` in the order torch's kernels take them (``_flat_weights``)."""
    names = []
    for layer in range(mod.num_layers):
        for d in range(2 if mod.bidirectional else 1):
            sfx = f"_l{layer}{'_reverse' if d else ''}"
            names += [f"{name}.weight_ih{sfx}", f"{name}.weight_hh{sfx}"]
            if mod.bias:
                names += [f"{name}.bias_ih{sfx}", f"{name}.bias_hh{sfx}"]
    return names


def _measure(mod: nn.Module, inputs: int, n: int, steps: int, batch: int, dtype: torch.dtype, batched: Any) -> bool:
    """Time both ways on random data for ``n`` slots; True where torch's kernel per slot is taken."""
    from .fast_path import _Runner  # the batched way runs under a runner of its own, on these weights

    dirs, gates = 2 if mod.bidirectional else 1, {"LSTM": 4, "GRU": 3}.get(mod.mode, 1)
    g = torch.Generator().manual_seed(0)
    params = {}
    for w in _weight_names("rnn", mod):
        kind, layer = w.split(".", 1)[1].split("_l")[0], int(w.split("_l")[1].split("_")[0])
        width = inputs if layer == 0 else dirs * mod.hidden_size
        shape = {"weight_ih": (gates * mod.hidden_size, width), "weight_hh": (gates * mod.hidden_size, mod.hidden_size)
                 }.get(kind, (gates * mod.hidden_size,))
        params[w] = (torch.randn((n, *shape), generator=g, dtype=dtype) * 0.1).requires_grad_(True)
    shape = (batch, steps, inputs) if mod.batch_first else (steps, batch, inputs)
    x = Act(torch.randn((n, *shape), generator=g, dtype=dtype), SLOT)
    runner = _Runner(None, params, {}, {}, "blas", False)  # no generators: the probe has no dropout
    probe = _Probe(mod)

    def per_slot() -> None:
        out, _ = rnn(runner, "rnn", probe, x, None)
        out.t.sum().backward()

    def other() -> None:
        out, _ = batched(runner, "rnn", probe, x, None)
        out.t.sum().backward()

    times = {}
    for way, fn in (("per_slot", per_slot), ("batched", other)):
        fn()  # warm up (allocations, oneDNN's primitive cache)
        rounds = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            rounds.append(time.perf_counter() - start)
        times[way] = sorted(rounds)[1]
    take = times["batched"] * MARGIN > times["per_slot"]
    logger.info("%s(%d, %d) over %d steps, batch %d, %d slots: torch's kernel per slot %.1f ms, batched %.1f ms: "
                "%s", mod.mode, inputs, mod.hidden_size, steps, batch, n, times["per_slot"] * 1e3,
                times["batched"] * 1e3, "per slot" if take else "batched")
    return take


class _Probe:
    """The layer's settings without its weights, training as in a step but without dropout (a measurement must
    not draw from any generator)."""

    def __init__(self, mod: nn.Module):
        for k in ("mode", "hidden_size", "num_layers", "bias", "bidirectional", "batch_first", "proj_size"):
            setattr(self, k, getattr(mod, k, 0))
        self.dropout, self.training = 0.0, True


__all__ = ["applies", "rnn"]
