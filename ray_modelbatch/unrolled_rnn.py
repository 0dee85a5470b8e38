"""``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` and their cells as plain tensor ops, so a stack of them fuses under
``torch.vmap``.

torch's recurrent modules call one fused kernel (``aten::lstm``, ``aten::gru``)
that has no vmap batching rule, so a stack of models containing one could not
train. :class:`UnrolledRNN` computes the same recurrence from ``F.linear`` and
elementwise ops, which vmap batches over slots:

- the input projection of every time step is one GEMM per layer and
  direction (``x @ W_ih^T + b_ih`` for the whole sequence at once);
- each time step adds the hidden projection (``h @ W_hh^T + b_hh``) and the
  gate nonlinearities, in PyTorch's gate order and formulas (LSTM ``i, f, g, o``;
  GRU ``r, z, n`` with the reset gate applied to the hidden projection).

It holds the very parameters of the module it replaces, under the same
names, so a stack's flat parameters, checkpoints and ``state_dict`` are those
of the user's ``nn.LSTM``. :func:`unroll_rnns` swaps them into the stack's
template (a meta-device copy of the model); the user's own model keeps its
``nn.LSTM``, and a slot trains exactly as it does, to float rounding. On the
direct path (no vmap) the stack does not run this forward: the tracer keeps
the module whole and :mod:`.direct_rnn` computes it for all slots at once.

Not covered (an error names it): ``proj_size`` and ``PackedSequence`` inputs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import FusionError
from .signature import MODULE_HOOKS


class UnrolledRNN(nn.Module):
    """The recurrence of an ``nn.RNNBase`` module (LSTM, GRU, RNN) written with vmap-friendly ops."""

    def __init__(self, rnn: nn.RNNBase):
        super().__init__()
        if getattr(rnn, "proj_size", 0):
            raise FusionError("nn.LSTM(proj_size=...) cannot be fused yet; use proj_size=0, or a Linear after the LSTM.")
        self.mode = rnn.mode
        self.hidden_size, self.num_layers = rnn.hidden_size, rnn.num_layers
        self.bias, self.batch_first = rnn.bias, rnn.batch_first
        self.dropout, self.bidirectional = float(rnn.dropout), rnn.bidirectional
        for name, p in rnn.named_parameters(recurse=False):  # the same Parameter objects, same names
            self.register_parameter(name, p)

    def _weights(self, layer: int, reverse: bool) -> tuple[Any, Any, Any, Any]:
        sfx = f"_l{layer}{'_reverse' if reverse else ''}"
        w_ih, w_hh = getattr(self, f"weight_ih{sfx}"), getattr(self, f"weight_hh{sfx}")
        b_ih = getattr(self, f"bias_ih{sfx}") if self.bias else None
        b_hh = getattr(self, f"bias_hh{sfx}") if self.bias else None
        return w_ih, w_hh, b_ih, b_hh

    def _cell(self, gx: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None, w_hh: torch.Tensor,
              b_hh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        gh = F.linear(h, w_hh, b_hh)
        if self.mode == "LSTM":
            i, f, g, o = (gx + gh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        if self.mode == "GRU":
            xr, xz, xn = gx.chunk(3, -1)
            hr, hz, hn = gh.chunk(3, -1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            return (1 - z) * n + z * h, None
        act = torch.tanh if self.mode == "RNN_TANH" else torch.relu
        return act(gx + gh), None

    def forward(self, input: Any, hx: Any = None) -> tuple[torch.Tensor, Any]:
        if isinstance(input, nn.utils.rnn.PackedSequence):
            raise FusionError("a fused nn.LSTM/GRU cannot take a PackedSequence yet; pad the batch and pass a tensor "
                              "(mask the padded steps in the loss).")
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        steps, batch = x.shape[0], x.shape[1]
        dirs = 2 if self.bidirectional else 1
        lstm = self.mode == "LSTM"
        if hx is None:
            zeros = x.new_zeros(self.num_layers * dirs, batch, self.hidden_size)
            h0, c0 = zeros, (zeros if lstm else None)
        else:
            h0, c0 = hx if lstm else (hx, None)
            if unbatched:
                h0, c0 = h0.unsqueeze(1), (c0.unsqueeze(1) if c0 is not None else None)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            outs = []
            for d in range(dirs):
                w_ih, w_hh, b_ih, b_hh = self._weights(layer, d == 1)
                gx = F.linear(x, w_ih, b_ih)  # every time step's input projection: one GEMM
                k = layer * dirs + d
                h, c = h0[k], (c0[k] if lstm else None)
                seq = []
                for t in (range(steps - 1, -1, -1) if d == 1 else range(steps)):
                    h, c = self._cell(gx[t], h, c, w_hh, b_hh)
                    seq.append(h)
                if d == 1:
                    seq.reverse()
                outs.append(torch.stack(seq))
                h_n.append(h)
                if lstm:
                    c_n.append(c)
            x = outs[0] if dirs == 1 else torch.cat(outs, -1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                x = F.dropout(x, self.dropout, True)
        h_n_t = torch.stack(h_n)
        c_n_t = torch.stack(c_n) if lstm else None
        out = x.squeeze(1) if unbatched else (x.transpose(0, 1) if self.batch_first else x)
        if unbatched:
            h_n_t = h_n_t.squeeze(1)
            c_n_t = c_n_t.squeeze(1) if c_n_t is not None else None
        return out, ((h_n_t, c_n_t) if lstm else h_n_t)


class UnrolledRNNCell(nn.Module):
    """One step of an ``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` written with vmap-friendly ops.

    ``aten::lstm_cell`` has no vmap batching rule and returns two tensors, so a
    stack of hand-unrolled LSTMCell loops could not run at all; ``gru_cell`` and
    ``rnn_tanh_cell`` fall back to one call per slot (torch warns of the
    "performance drop"). This computes each cell's formula as ATen does
    (LSTM: ``c' = sigmoid(f) * c + sigmoid(i) * tanh(g)``, ``h' = sigmoid(o) *
    tanh(c')``; GRU: ``n = tanh(x_n + r * h_n)``, ``h' = (h - n) * z + n``),
    from the very parameters of the cell it replaces, under the same names.
    """

    def __init__(self, cell: nn.RNNCellBase):
        super().__init__()
        self.mode = ("LSTM" if isinstance(cell, nn.LSTMCell) else "GRU" if isinstance(cell, nn.GRUCell)
                     else "RNN_RELU" if cell.nonlinearity == "relu" else "RNN_TANH")
        self.replaces = type(cell).__name__  # what messages call it (the user's model has that class)
        self.input_size, self.hidden_size, self.bias = cell.input_size, cell.hidden_size, cell.bias
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):  # the same Parameters (None without bias)
            self.register_parameter(name, getattr(cell, name))

    def forward(self, input: torch.Tensor, hx: Any = None) -> Any:
        if input.dim() not in (1, 2):
            raise ValueError(f"{self.mode} cell: expected input to be 1D or 2D, got {input.dim()}D instead")
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        lstm = self.mode == "LSTM"
        if hx is None:
            zeros = x.new_zeros(x.size(0), self.hidden_size)
            h, c = zeros, zeros
        elif lstm:
            h, c = hx if batched else (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        else:
            h, c = (hx if batched else hx.unsqueeze(0)), None
        gx, gh = F.linear(x, self.weight_ih, self.bias_ih), F.linear(h, self.weight_hh, self.bias_hh)
        if lstm:
            i, f, g, o = (gh + gx).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            return (h, c) if batched else (h.squeeze(0), c.squeeze(0))
        if self.mode == "GRU":
            xr, xz, xn = gx.chunk(3, 1)
            hr, hz, hn = gh.chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
            h = (h - n) * z + n
        else:
            h = torch.tanh(gh + gx) if self.mode == "RNN_TANH" else torch.relu(gh + gx)
        return h if batched else h.squeeze(0)


# the hook dicts, and the bookkeeping of which hooks take keyword arguments or run always
_HOOK_ATTRS = (*MODULE_HOOKS, "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_is_full_backward_hook")


def unroll_rnns(model: nn.Module) -> nn.Module:
    """Replace every ``nn.LSTM``/``nn.GRU``/``nn.RNN`` in ``model`` (in place) by an :class:`UnrolledRNN`, and
    every ``nn.LSTMCell``/``nn.GRUCell``/``nn.RNNCell`` by an :class:`UnrolledRNNCell`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.RNNBase):
            unrolled = UnrolledRNN(module)
        elif isinstance(module, nn.RNNCellBase):
            unrolled = UnrolledRNNCell(module)
        else:
            continue
        unrolled.train(module.training)
        for attr in _HOOK_ATTRS:  # hooks put on the layer run on its stand-in, as on the layer alone
            if hasattr(module, attr):
                setattr(unrolled, attr, getattr(module, attr))
        if not name:
            return unrolled
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, unrolled)
    return model
