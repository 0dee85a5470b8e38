"""Recurrent layers on the direct path: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` of every slot at once.

Why a kernel of its own: under ``torch.vmap`` the stack runs
:class:`~ray_modelbatch.unrolled_rnn.UnrolledRNN`, whose every time step is
about ten batched ops forward and more in backward, each paying vmap's and
autograd's per-op cost: an LSTM stack trained at 0.55-0.6x the speed of a
plain loop of the models (whose ``nn.LSTM`` runs oneDNN's fused LSTM), a GRU
stack at 1.3x. Here each layer and direction is one autograd Function whose
forward runs, per time step, one batched GEMM over the slots and the gate
math on ``[n, B, G]`` tensors written into buffers allocated once for the
sequence, and whose backward is back-propagation through time written out
(torch's fused ``sigmoid_backward``/``tanh_backward`` for the gates, batched
GEMMs for the state and weight gradients). Autograd records one node per
layer and direction instead of ~10 per time step.

* LSTM and Elman RNN (:class:`_Gates`): the step's inputs, previous state and
  a column of ones lie side by side in one buffer, the weights in one
  ``[W_ih | W_hh | b_ih + b_hh]``, so each step's gates are one GEMM, input
  projection and biases included, and each step's weight gradient is one GEMM
  accumulated while the step's gate gradients are in cache. Measured on 2
  shared cores (32 slots, the benchmark's layer below), a layer's forward and
  backward took 51 ms, against 55 ms with the input projection of the whole
  sequence done first (``runner.project``: 32 MB written, then read back
  slice by slice and copied into every step's GEMM).
* GRU (:class:`_GRU`): its ``b_hn`` acts inside the reset gate, so the input
  projection of the whole sequence stays one batched GEMM of its own
  (``runner.project``, the direct path's Linear), and each step's GEMM gives the
  hidden projection the gates need apart.

Buffers that a step's GEMM writes are time-major (``[T, n, B, G]``): MKL's
batched GEMM needs a contiguous result, and into a strided one torch runs
one small GEMM per slot (measured 30% slower). On a CPU whose torch kernels
are AVX2 ones, ``tanh`` is computed as ``2 sigmoid(2x) - 1``: there torch's
tanh is 3.5x slower than its sigmoid (with AVX-512 kernels it is faster than
the sigmoid: :func:`_tanh`). An LSTM's ``g`` gate shares the one sigmoid of all
four gates (its rows are doubled in the stacked weights). The math is otherwise
PyTorch's (gate order LSTM ``i, f, g, o``, GRU ``r, z, n``, see
:mod:`.unrolled_rnn`), so a slot trains like its model alone to float
rounding, not bitwise, and not bitwise alike for another number of slots
either (elementwise kernels split their loops by size): plans with these
layers are not gather-exact.

Measured with ``benchmarks/fused_step.py --models lstm,gru --slots 8,32
--quick`` (``nn.LSTM``/``nn.GRU(32, 64)`` over 16 steps, batch 64, Adam; 2
shared cores), one fused step of S slots took, against vmap before: LSTM
18.5-20 ms (was 38-46) at S = 8 and 55-60 ms (was 137-162) at S = 32; GRU
18.3-19.3 (32-37) and 51.5-56 ms (105-127). Against a loop of S models with
``torch.optim`` that is LSTM 1.25-1.4x and 1.55-2.0x, GRU 2.3-2.6x and
3.0-3.7x (the loop's own time varied by 20% between runs; its ``nn.LSTM`` is
oneDNN's fused LSTM kernel). At S = 32 the LSTM's batched GEMMs alone take
~38 ms of the step, so closing in on oneDNN's kernel further would take a
fused kernel for the gate math, which torch does not have on CPU.

Not covered here (the stack falls back to vmap, which explains or runs it):
``PackedSequence`` inputs, autocast, ``proj_size`` (refused when the stack
is built, see :mod:`.unrolled_rnn`).
"""

from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from . import per_slot_rnn
from .direct_kernels import CHAN, SHARED, SLOT, Act, Unsupported

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_aten = torch.ops.aten


def rnn_ok(mod: nn.Module) -> bool:
    """Whether :func:`rnn` computes ``mod`` (an ``nn.RNNBase`` or an ``UnrolledRNN``): no ``proj_size``."""
    return getattr(mod, "mode", None) in _GATES and not getattr(mod, "proj_size", 0)


def rnn(runner: Any, name: str, mod: nn.Module, input: Any, hx: Any = None) -> tuple:  # noqa: A002 - torch's name
    """``mod(input, hx)`` of every slot: ``(output, h_n)``, or ``(output, (h_n, c_n))`` for an LSTM.

    ``input`` is ``[B, T, I]`` (batch first), ``[T, B, I]`` or unbatched
    ``[T, I]``, shared by every slot or per slot; ``hx`` is None, a tensor
    (GRU, RNN) or a pair (LSTM) of ``[layers * directions, B, H]`` (unbatched
    ``[layers * directions, H]``), shared or per slot. Every result is in the
    slot layout, shaped as ``mod`` alone shapes it.
    """
    n = runner.n
    if not isinstance(input, Act) or input.layout == CHAN:
        raise Unsupported("a recurrent layer's input that is not a padded tensor (a PackedSequence?)")
    if runner.autocast:
        raise Unsupported("recurrent layers under autocast")
    rank = len(input.sample_shape(n))
    if rank not in (2, 3) or input.sample_shape(n)[-1] != runner.params[f"{name}.weight_ih_l0"].shape[2]:
        raise Unsupported("a recurrent layer's input of another shape")
    if per_slot_rnn.applies(runner, name, mod, input, _batched):  # torch's own kernel per slot: see there
        return per_slot_rnn.rnn(runner, name, mod, input, hx)
    return _batched(runner, name, mod, input, hx)


def _batched(runner: Any, name: str, mod: nn.Module, input: Act, hx: Any) -> tuple:  # noqa: A002
    """:func:`rnn` as one batched GEMM per time step over the slots (the module docstring)."""
    n = runner.n
    unbatched = len(input.sample_shape(n)) == 2
    x = _time_major(input, mod.batch_first, unbatched)
    steps, batch = x.sample_shape(n)[:2]
    if steps == 0:
        raise Unsupported("an empty sequence")
    h0, c0 = _initial_state(runner, mod, hx, batch, unbatched)
    out, h_n, c_n, last = _layers(runner, name, mod, x, h0, c0)
    if unbatched:
        out, h_n, last = out.squeeze(2), h_n.squeeze(2), last.squeeze(1)
        c_n = None if c_n is None else c_n.squeeze(2)
    elif mod.batch_first:
        out = out.transpose(1, 2)
    state = Act(h_n, SLOT) if c_n is None else (Act(h_n, SLOT), Act(c_n, SLOT))
    if mod.bidirectional:
        return Act(out, SLOT), state
    return SequenceAct(out, SLOT, last, 1 if mod.batch_first and not unbatched else 0), state


@dataclass
class SequenceAct(Act):
    """A one-directional recurrent layer's outputs, with its last step as a tensor of its own.

    A classifier reads ``out[:, -1]``. Taken from ``out``, that step's
    gradient would come back as a zero tensor the size of every output,
    written by autograd's ``select_backward`` and read again by every step of
    back-propagation (about 3% of an LSTM stack's step: 32 slots, 16 steps).
    :func:`last_step` gives ``last`` instead, a separate output of the layer's
    Function, whose gradient enters back-propagation at the last step alone.
    It is a copy of the same values, so each slot computes what it did.
    """

    last: torch.Tensor  # [n, B, H] (unbatched [n, H]): the last time step of the last layer
    time_dim: int  # where the time steps are in one slot's output (1 for batch_first)


def last_step(obj: Act, index: Any, n: int) -> Act | None:
    """``obj[index]`` when ``obj`` is a :class:`SequenceAct` and ``index`` takes its last time step whole
    (``out[:, -1]``, ``out[-1]``, ``out[:, T - 1, :]``); else None, for the plain indexing."""
    if not isinstance(obj, SequenceAct):
        return None
    idx = list(index)
    while len(idx) > obj.time_dim + 1 and (idx[-1] is Ellipsis or idx[-1] == slice(None)):
        idx.pop()
    if len(idx) != obj.time_dim + 1 or any(i != slice(None) for i in idx[:-1]):
        return None
    t, steps = idx[-1], obj.sample_shape(n)[obj.time_dim]
    if isinstance(t, bool) or not isinstance(t, int) or t not in (-1, steps - 1):
        return None
    return Act(obj.last, SLOT)


def _time_major(x: Act, batch_first: bool, unbatched: bool) -> Act:
    """The input as ``[T, B, I]`` (shared) or ``[n, T, B, I]`` (per slot): views, no copies."""
    lead = int(x.layout == SLOT)
    if unbatched:  # [T, I]: a batch of one
        return Act(x.t.unsqueeze(lead + 1), x.layout)
    return Act(x.t.transpose(lead, lead + 1) if batch_first else x.t, x.layout)


def _initial_state(runner: Any, mod: nn.Module, hx: Any, batch: int,
                   unbatched: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``hx`` as ``[n, layers * directions, B, H]`` tensors ``(h0, c0)`` (views; None where not given)."""
    if hx is None:
        return None, None
    lstm = mod.mode == "LSTM"
    parts = tuple(hx) if lstm and isinstance(hx, (tuple, list)) and len(hx) == 2 else (hx,)
    if len(parts) != (2 if lstm else 1) or not all(isinstance(p, Act) and p.layout != CHAN for p in parts):
        raise Unsupported("an initial state the recurrent layer does not take")
    dirs = 2 if mod.bidirectional else 1
    want = (mod.num_layers * dirs, mod.hidden_size) if unbatched else (mod.num_layers * dirs, batch, mod.hidden_size)
    states = []
    for p in parts:
        if tuple(p.sample_shape(runner.n)) != want:
            raise Unsupported("an initial state of another shape")  # vmap's path gives torch's error
        t = runner.slot(p)
        states.append(t.unsqueeze(2) if unbatched else t)
    return states[0], (states[1] if lstm else None)


def _layers(runner: Any, name: str, mod: nn.Module, x: Act, h0: torch.Tensor | None,
            c0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Every layer and direction: the last layer's ``[n, T, B, dirs * H]``, ``h_n`` (``c_n``),
    ``[n, layers * dirs, B, H]``, and the last direction's last output apart (``[n, B, H]``). Dropout
    (training) acts between layers, a mask per slot and element."""
    dirs = 2 if mod.bidirectional else 1
    h_n: list[torch.Tensor] = []
    c_n: list[torch.Tensor] = []
    for layer in range(mod.num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            y, h_last, c_last = _direction(runner, name, mod, x, layer, d == 1, None if h0 is None else h0[:, k],
                                           None if c0 is None else c0[:, k])
            outs.append(y)
            h_n.append(h_last)
            if c_last is not None:
                c_n.append(c_last)
        y = outs[0] if dirs == 1 else torch.cat(outs, -1)
        if mod.dropout and mod.training and layer < mod.num_layers - 1:  # each slot's mask from its generator
            y = runner.dropout(Act(y, SLOT), float(mod.dropout)).t
        x = Act(y, SLOT)
    return y, torch.stack(h_n, 1), (torch.stack(c_n, 1) if c_n else None), h_n[-1]


def _direction(runner: Any, name: str, mod: nn.Module, x: Act, layer: int, reverse: bool,
               h0: torch.Tensor | None,
               c0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One layer in one direction: its outputs ``[n, T, B, H]``, its last output (a tensor of its own) and,
    for an LSTM, its last cell state."""
    sfx = f"_l{layer}{'_reverse' if reverse else ''}"
    wname, bname = f"{name}.weight_ih{sfx}", f"{name}.bias_ih{sfx}"
    w_ih, w_hh = runner.params[wname], runner.params[f"{name}.weight_hh{sfx}"]
    b_ih = runner.params[bname] if mod.bias else None
    b_hh = runner.params[f"{name}.bias_hh{sfx}"] if mod.bias else None
    if mod.mode == "GRU":  # b_hn sits inside the reset gate: the input projection stays apart (see _GRU)
        gx = runner.project(x, w_ih, b_ih, wname, bname)  # [n, T, B, 3H]: every step's input projection
        return (*_GRU.apply(gx, w_hh, b_hh, h0, reverse), None)
    x_t = x.t if x.layout == SHARED else runner.slot(x)  # [T, B, I] shared or [n, T, B, I]
    out = _Gates.apply(x_t, w_ih, w_hh, b_ih, b_hh, h0, c0, mod.mode, reverse)
    return out if mod.mode == "LSTM" else (*out, None)


def _tanh(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``tanh(x)`` into ``out`` (which may be ``x``): for fp32 on a CPU with AVX2 kernels as ``2 sigmoid(2x) - 1``.

    There torch's CPU tanh is 3.5x slower than its sigmoid (AMD EPYC, 131k
    elements: 445 against 126 us), and the scalings cost ~15 us each; the
    result is within a rounding of 1 (~2e-7) of ``torch.tanh``. With AVX-512
    kernels torch's tanh is the faster (2-core Xeon, ``[32, 64, 64]``: 18 us
    against 51 us for the four passes, 24 us for a sigmoid alone). The choice
    follows torch's CPU capability, not a timing, so every process on one
    machine rounds alike (a slot that moves between hosts trains on bit for bit).
    """
    if x.dtype != torch.float32 or x.device.type != "cpu" or not _tanh_as_sigmoid():
        return torch.tanh(x, out=out)
    return torch.mul(x, 2, out=out).sigmoid_().mul_(2).sub_(1)


@functools.cache
def _tanh_as_sigmoid() -> bool:
    """Whether this CPU's torch kernels are slower for tanh than for sigmoid: all but the AVX-512 ones."""
    return not torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _order(steps: int, reverse: bool) -> list[int]:
    """The time steps in the order the recurrence runs them."""
    return list(range(steps - 1, -1, -1) if reverse else range(steps))


# ----------------------------------------------------------------------------------------- LSTM, RNN
class _Gates(torch.autograd.Function):
    """An LSTM or Elman RNN layer in one direction, every slot: one batched GEMM per step on ``[x_t | h | 1]``.

    ``x`` is ``[T, B, I]`` (shared) or ``[n, T, B, I]``, ``w_ih`` ``[n, G, I]``,
    ``w_hh`` ``[n, G, H]``, biases ``[n, G]`` or None, ``h0``/``c0``
    ``[n, B, H]`` or None (zeros). Returns the outputs ``[n, T, B, H]``, the
    last of them apart (see :class:`SequenceAct`) and an LSTM's last cell
    state. Gradients are not materialized: an output nobody used gives None.

    The inputs, the hidden states and a column of ones lie side by side in one
    buffer ``xh`` ``[n, T + 1, B, I + H + 1]`` (row ``t`` holds ``x_t`` and the
    state step ``t`` starts from; each step writes its output into the next
    row, and the outputs returned are a view of those columns), and the weights
    in one ``[W_ih | W_hh | b_ih + b_hh]``. So each step's gates are one GEMM
    that writes them in place, input projection and biases included: no
    projection of the whole sequence to write out and read back, no bias to
    add, and the weight gradient of every step (``dgates_t^T @ xh_t``) is one
    GEMM accumulated into ``[dW_ih | dW_hh | db]`` while ``dgates_t`` is still in
    cache. An LSTM's ``g`` rows are doubled in that copy of the weights, so one
    sigmoid computes all four gates (``tanh(u) = 2 sigmoid(2u) - 1``).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor | None,
                b_hh: torch.Tensor | None, h0: torch.Tensor | None, c0: torch.Tensor | None, mode: str,
                reverse: bool) -> Any:
        n, gates, hidden = w_hh.shape
        steps, batch, inp = x.shape[-3:]
        xh = _stacked_inputs(x, h0, n, hidden, b_ih is not None, reverse)
        w = torch.cat([w_ih, w_hh] + ([] if b_ih is None else [(b_ih + b_hh).unsqueeze(2)]), 2)
        order = _order(steps, reverse)
        ctx.mode, ctx.order, ctx.reverse, ctx.shared, ctx.inp = mode, order, reverse, x.dim() == 3, inp
        xhs, hs = xh.unbind(1), xh[..., inp:inp + hidden].unbind(1)
        ctx.set_materialize_grads(False)
        if mode == "LSTM":
            w[:, 2 * hidden:3 * hidden].mul_(2)
            c0 = w.new_zeros(n, batch, hidden) if c0 is None else c0.contiguous()
            act, c_all, tc_all = _lstm_forward(xhs, hs, w.transpose(1, 2).contiguous(), c0, order, reverse)
            ctx.save_for_backward(xh, w_ih, w_hh, c0, act, c_all, tc_all)
        else:
            _elman_forward(xhs, hs, w.transpose(1, 2).contiguous(), order, reverse, mode)
            ctx.save_for_backward(xh, w_ih, w_hh)
        y = xh[:, 1 - reverse:steps + 1 - reverse, :, inp:inp + hidden]
        h_last = hs[order[-1] + 1 - reverse].clone()
        return (y, h_last, c_all[order[-1]].clone()) if mode == "LSTM" else (y, h_last)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor | None, dh_last: torch.Tensor | None,
                 dc_last: torch.Tensor | None = None) -> tuple[Any, ...]:
        need = ctx.needs_input_grad
        if ctx.mode == "LSTM":
            xh, w_ih, w_hh, c0, act, c_all, tc_all = ctx.saved_tensors
            cell = _LSTMBackwardStep(act, c_all, tc_all, c0, ctx.order, dc_last)
        else:
            xh, w_ih, w_hh = ctx.saved_tensors
            cell = _elman_backward_step(xh[..., ctx.inp:ctx.inp + w_hh.shape[2]], ctx.reverse, ctx.mode)
        dw_t, dx, dh0 = _gates_backprop(cell, dy, dh_last, xh, w_ih, w_hh, ctx.order, ctx.reverse, need[0],
                                        need[5])
        inp, hidden = ctx.inp, w_hh.shape[2]
        dw = dw_t.transpose(1, 2)
        db = dw[..., -1] if dw.shape[2] > inp + hidden else None
        if dx is not None:
            dx = dx.sum(1) if ctx.shared else dx.transpose(0, 1)  # from time-major [T, n, B, I]
        dc0 = cell.dc if ctx.mode == "LSTM" and need[6] else None
        return (dx, dw[..., :inp], dw[..., inp:inp + hidden], db, None if db is None else db.clone(), dh0, dc0,
                None, None)


def _stacked_inputs(x: torch.Tensor, h0: torch.Tensor | None, n: int, hidden: int, bias: bool,
                    reverse: bool) -> torch.Tensor:
    """``xh`` ``[n, T + 1, B, I + H (+ 1)]``: ``x_t`` in row ``t`` (``t + 1`` in reverse, whose steps start
    from the state after them), ``h0`` where the first step reads its state, ones in the bias column."""
    steps, batch, inp = x.shape[-3:]
    xh = x.new_empty(n, steps + 1, batch, inp + hidden + bias)
    xh[:, int(reverse):steps + int(reverse), :, :inp] = x
    first = xh[:, steps if reverse else 0, :, inp:inp + hidden]
    first.zero_() if h0 is None else first.copy_(h0)
    if bias:
        xh[..., -1] = 1
    return xh


def _gates_backprop(cell: Any, dy: torch.Tensor | None, dh_last: torch.Tensor | None, xh: torch.Tensor,
                    w_ih: torch.Tensor, w_hh: torch.Tensor, order: Sequence[int], reverse: bool, need_x: bool,
                    need_h0: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Back-propagation through time for :class:`_Gates`: per step, ``cell(t, dh, dgates)`` writes the
    gradient of the step's gates into ``dgates`` (one buffer for every step), then one GEMM adds the step's
    weight gradient, one gives ``dx_t`` (if needed) and one the gradient of the previous output,
    ``dy_prev + dgates @ W_hh`` (``dy`` None: no output but the last was used). Returns ``[dW_ih | dW_hh |
    db]`` transposed (``[n, I + H (+ 1), G]``: MKL accumulates that layout 10% faster), ``dx`` time-major and
    ``dh0``."""
    n, gates, _ = w_hh.shape
    batch = xh.shape[2]
    dgates = xh.new_empty(n, batch, gates)
    dw_t = xh.new_empty(n, xh.shape[3], gates)
    dx = xh.new_empty(len(order), n, batch, w_ih.shape[2]) if need_x else None
    xhs = xh.unbind(1)
    back = list(reversed(order))
    dys, dh = _last_gradient(dy, dh_last, back[0], (n, batch, w_hh.shape[2]), xh)
    dh0 = None
    for j, t in enumerate(back):
        cell(t, dh, dgates)
        rows = xhs[t + reverse].transpose(1, 2)  # what step t read: [x_t | h_prev | 1]
        torch.bmm(rows, dgates, out=dw_t) if j == 0 else dw_t.baddbmm_(rows, dgates)
        if dx is not None:
            torch.bmm(dgates, w_ih, out=dx[t])
        if j + 1 < len(back):
            dh = torch.bmm(dgates, w_hh) if dys is None else torch.baddbmm(dys[back[j + 1]], dgates, w_hh)
        elif need_h0:
            dh0 = torch.bmm(dgates, w_hh)
    return dw_t, dx, dh0


def _last_gradient(dy: torch.Tensor | None, dh_last: torch.Tensor | None, last: int, shape: tuple[int, ...],
                   like: torch.Tensor) -> tuple[Sequence[torch.Tensor] | None, torch.Tensor]:
    """The outputs' gradients by step (None if the outputs were not used) and the gradient of the last
    step's output: its part of ``dy`` plus ``dh_last``, the gradient of that output taken apart."""
    dys = None if dy is None else dy.unbind(1)
    if dys is None:
        return None, like.new_zeros(shape) if dh_last is None else dh_last
    return dys, dys[last] if dh_last is None else dys[last] + dh_last


def _lstm_forward(xhs: Sequence[torch.Tensor], hs: Sequence[torch.Tensor], w_t: torch.Tensor, c0: torch.Tensor,
                  order: Sequence[int], reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LSTM steps (``w_t``: the stacked weights, transposed, ``g`` rows doubled), each output into the next
    row's state columns; returns the activated gates ``i, f, g, o`` ``[T, n, B, 4H]``, the cell states and
    their tanh (``[T, n, B, H]``), kept for backward."""
    n, batch, hidden = c0.shape
    steps = len(order)
    act = c0.new_empty(steps, n, batch, 4 * hidden)
    c_all = c0.new_empty(steps, n, batch, hidden)
    tc_all = torch.empty_like(c_all)
    acts, cs, tcs = act.unbind(0), c_all.unbind(0), tc_all.unbind(0)
    i_s, f_s, g_s, o_s = (gate.unbind(0) for gate in act.chunk(4, -1))
    c = c0
    for t in order:
        torch.bmm(xhs[t + reverse], w_t, out=acts[t])  # contiguous: MKL's batched GEMM writes it in place
        acts[t].sigmoid_()
        g_s[t].mul_(2).sub_(1)  # tanh of the g pre-activation, whose rows were doubled
        torch.mul(f_s[t], c, out=cs[t]).addcmul_(i_s[t], g_s[t])
        _tanh(cs[t], tcs[t])
        torch.mul(o_s[t], tcs[t], out=hs[t + 1 - reverse])
        c = cs[t]
    return act, c_all, tc_all


class _LSTMBackwardStep:
    """One LSTM step of back-propagation: the gates' pre-activation gradients from ``dh`` and the carried
    ``dc``; afterwards ``dc`` is the gradient of the state the step started from."""

    def __init__(self, act: torch.Tensor, c_all: torch.Tensor, tc_all: torch.Tensor, c0: torch.Tensor,
                 order: Sequence[int], dc_last: torch.Tensor | None):
        hidden = c0.shape[2]
        self.tcs = tc_all.unbind(0)
        self.gates = [gate.unbind(0) for gate in act.chunk(4, -1)]
        self.i_f = act[..., :2 * hidden].unbind(0)  # i and f side by side: one sigmoid_backward for both
        self.c_prev = [c0] * len(order)
        cs = c_all.unbind(0)
        for j in range(1, len(order)):
            self.c_prev[order[j]] = cs[order[j - 1]]
        self.dc = dc_last
        self.dgates: torch.Tensor | None = None
        self.views: tuple = ()

    def __call__(self, t: int, dh: torch.Tensor, dgates: torch.Tensor) -> None:
        if dgates is not self.dgates:  # the same buffer every step: its gate views are made once
            self.dgates, self.views = dgates, (*dgates.chunk(4, -1), dgates[..., :2 * dgates.shape[-1] // 4])
        di, df, dg, do, d_if = self.views
        i, f, g, o = (gate[t] for gate in self.gates)
        tc = self.tcs[t]
        torch.mul(dh, tc, out=do)
        _aten.sigmoid_backward.grad_input(do, o, grad_input=do)
        dc = _aten.tanh_backward(dh, tc)  # dc = dc_next + dh * o * (1 - tanh(c)^2)
        dc.mul_(o) if self.dc is None else torch.addcmul(self.dc, dc, o, out=dc)
        torch.mul(dc, g, out=di)
        torch.mul(dc, self.c_prev[t], out=df)
        _aten.sigmoid_backward.grad_input(d_if, self.i_f[t], grad_input=d_if)
        torch.mul(dc, i, out=dg)
        _aten.tanh_backward.grad_input(dg, g, grad_input=dg)
        self.dc = dc.mul_(f)


def _elman_forward(xhs: Sequence[torch.Tensor], hs: Sequence[torch.Tensor], w_t: torch.Tensor,
                   order: Sequence[int], reverse: bool, mode: str) -> None:
    """Elman RNN steps, ``h' = act(x_t W_ih^T + h W_hh^T + b)``, each output into the next row's state."""
    pre = None
    for t in order:
        pre = torch.bmm(xhs[t + reverse], w_t, out=pre)  # one contiguous scratch for every step
        h = hs[t + 1 - reverse]
        _tanh(pre, h) if mode == "RNN_TANH" else torch.clamp(pre, min=0, out=h)


def _elman_backward_step(h_cols: torch.Tensor, reverse: bool, mode: str) -> Callable[..., None]:
    """One Elman step of back-propagation: ``dgates = dh * act'(output)`` (``h_cols``: the state columns)."""
    hs = h_cols.unbind(1)

    def step(t: int, dh: torch.Tensor, dgates: torch.Tensor) -> None:
        h = hs[t + 1 - reverse]
        if mode == "RNN_TANH":
            _aten.tanh_backward.grad_input(dh, h, grad_input=dgates)
        else:  # relu's gradient where its output is positive, as torch's
            _aten.threshold_backward.grad_input(dh, h, 0, grad_input=dgates)

    return step


# ------------------------------------------------------------------------------------------------- GRU
class _GRU(torch.autograd.Function):
    """A GRU layer in one direction for every slot, given its input projection.

    ``gx`` is ``[n, T, B, 3H]`` (``x @ W_ih^T + b_ih``), ``w_hh`` ``[n, 3H, H]``,
    ``b_hh`` ``[n, 3H]`` or None, ``h0`` ``[n, B, H]`` or None (zeros).
    Returns the outputs ``[n, T, B, H]`` and the last of them apart (see
    :class:`SequenceAct`). GRU's ``b_hn`` is added inside the
    reset gate (``n = tanh(x_n + r * (h W_hn^T + b_hn))``), so the hidden
    projection stays apart from the input's; per step it is one batched GEMM
    into a contiguous slice of a time-major buffer (MKL's batched GEMM needs a
    contiguous result; into a strided one torch runs one GEMM per slot).
    """

    @staticmethod
    def forward(ctx: Any, gx: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None,
                h0: torch.Tensor | None, reverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n, steps, batch, _ = gx.shape
        hidden = w_hh.shape[2]
        h0 = gx.new_zeros(n, batch, hidden) if h0 is None else h0.contiguous()
        y = gx.new_empty(n, steps, batch, hidden)
        order = _order(steps, reverse)
        act, gh = _gru_forward(gx, w_hh, b_hh, h0, y, order)
        ctx.save_for_backward(w_hh, h0, y, act, gh)
        ctx.order, ctx.has_bias = order, b_hh is not None
        ctx.set_materialize_grads(False)
        return y, y[:, order[-1]].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor | None, dh_last: torch.Tensor | None) -> tuple[Any, ...]:
        need = ctx.needs_input_grad
        w_hh, h0, y, act, gh = ctx.saved_tensors
        dgx, dgh, dh0 = _gru_backward(dy, dh_last, w_hh, h0, y, act, gh, ctx.order, need[3])
        dw = _weight_grad(dgh, y, h0, ctx.order) if need[1] else None
        db = dgh.sum((1, 2)) if ctx.has_bias and need[2] else None
        return dgx if need[0] else None, dw, db, dh0 if need[3] else None, None


def _previous(order: Sequence[int], h0: torch.Tensor, hs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """For every time step (by index), the state the step starts from: ``h0`` for the first one run."""
    prev = [h0] * len(order)
    for j in range(1, len(order)):
        prev[order[j]] = hs[order[j - 1]]
    return prev


def _weight_grad(dgh: torch.Tensor, y: torch.Tensor, h0: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """``dW_hh[s] = sum_t dgh_t^T @ h_prev_t`` (``dgh`` ``[n, T, B, G]``): one GEMM over all steps but the
    first one run (whose previous state is ``h0``), read in place from the outputs (``y`` shifted by one
    step), plus one for that step."""
    first, steps = order[0], len(order)
    dw = torch.bmm(dgh[:, first].transpose(1, 2), h0)
    if steps > 1:
        if first == 0:  # forward in time: step t starts from y[t - 1]
            rest, prev = dgh[:, 1:], y[:, :-1]
        else:  # reverse: step t starts from y[t + 1]
            rest, prev = dgh[:, :-1], y[:, 1:]
        dw.baddbmm_(rest.flatten(1, 2).transpose(1, 2), prev.flatten(1, 2))
    return dw


def _gru_forward(gx: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None, h0: torch.Tensor,
                 y: torch.Tensor, order: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """GRU steps as torch's cell computes them (``n = tanh(x_n + r * (h W_hn^T + b_hn))``, ``h' = (h - n) * z
    + n``), outputs into ``y``; returns the activated gates ``r, z, n`` and the hidden projections
    (``[T, n, B, 3H]`` each), kept for backward."""
    n, steps, batch, gates = gx.shape
    hidden = gates // 3
    act = gx.new_empty(steps, n, batch, gates)
    gh = torch.empty_like(act)
    w_t = w_hh.transpose(1, 2).contiguous()
    bias = None if b_hh is None else b_hh.unsqueeze(1)
    gxs, ys = gx.unbind(1), y.unbind(1)
    h = h0
    for t in order:
        x_t, a, g = gxs[t], act[t], gh[t]
        torch.bmm(h, w_t, out=g) if bias is None else torch.baddbmm(bias, h, w_t, out=g)
        torch.add(x_t[..., :2 * hidden], g[..., :2 * hidden], out=a[..., :2 * hidden]).sigmoid_()
        r, z, new = a.chunk(3, -1)
        _tanh(torch.addcmul(x_t[..., 2 * hidden:], r, g[..., 2 * hidden:], out=new), new)
        torch.sub(h, new, out=ys[t]).mul_(z).add_(new)
        h = ys[t]
    return act, gh


def _gru_backward(dy: torch.Tensor | None, dh_last: torch.Tensor | None, w_hh: torch.Tensor, h0: torch.Tensor,
                  y: torch.Tensor, act: torch.Tensor, gh: torch.Tensor, order: Sequence[int],
                  need_h0: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gradients of ``gx`` and of the hidden projections (both ``[n, T, B, 3H]``: they share ``r, z``)
    and of ``h0``. Per step, the gate gradients, then ``dh_prev = dy_prev + dh * z + dgh_t @ W_hh``
    (``dy`` None: no output but the last was used)."""
    hidden = w_hh.shape[2]
    dgh = act.new_empty(act.shape[1], act.shape[0], *act.shape[2:])
    dnew_all = torch.empty_like(y)
    dghs, dnews = dgh.unbind(1), dnew_all.unbind(1)
    h_prev = _previous(order, h0, y.unbind(1))
    back = list(reversed(order))
    dys, dh = _last_gradient(dy, dh_last, back[0], h0.shape, y)
    for j, t in enumerate(back):
        r, z, new = act[t].chunk(3, -1)
        dr, dz, dgh_n = dghs[t].chunk(3, -1)
        dnew = dnews[t]
        dhz = torch.mul(dh, z)  # the part of dh_prev through h' = (h - n) * z + n
        torch.sub(dh, dhz, out=dnew)
        _aten.tanh_backward.grad_input(dnew, new, grad_input=dnew)
        torch.sub(h_prev[t], new, out=dz).mul_(dh)
        _aten.sigmoid_backward.grad_input(dz, z, grad_input=dz)
        torch.mul(dnew, gh[t][..., 2 * hidden:], out=dr)
        _aten.sigmoid_backward.grad_input(dr, r, grad_input=dr)
        torch.mul(dnew, r, out=dgh_n)
        if j + 1 < len(back):
            dh = torch.baddbmm(dhz if dys is None else dhz.add_(dys[back[j + 1]]), dghs[t], w_hh)
        elif need_h0:
            return torch.cat((dgh[..., :2 * hidden], dnew_all), -1), dgh, torch.baddbmm(dhz, dghs[t], w_hh)
    return torch.cat((dgh[..., :2 * hidden], dnew_all), -1), dgh, None
