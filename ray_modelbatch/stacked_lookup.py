"""Embedding lookups in every slot's table at once, read in place, under ``torch.vmap`` and on the direct path.

Why: a stack keeps each slot's embedding table as a strided ``[n, V, D]``
view of the flat parameter buffer (one row of ``[S, P]`` per slot). torch's
vmap rule for ``F.embedding`` with one table per slot first makes the tables
one flat ``[n*V, D]`` tensor, which from that view is a copy of every slot's
whole table at every lookup: for a BERT classifier at 32 slots (V = 2000, D =
64) two copies of 16 MB per step (its word embedding is looked up twice, see
padding below); with BERT-base's 30,522 x 768 rows it would be 94 MB per slot
and lookup. Its backward then adds the rows into a table laid out ``[V, n,
D]``, which autograd copies once more into the parameter's layout.

Here the forward gathers ``tables[slot, idx]`` straight from the strided view,
and the backward adds every looked-up row's gradient into a ``[n, V, D]``
gradient (which a stacked parameter takes without a copy): on a CPU with one
``index_add``, the same sums in the same order as torch's own backward, so the
same bits (tested); elsewhere with torch's own embedding backward, whose sums
do not depend on the order of atomic adds. Rows looked up at
``pad`` (>= 0) get no gradient, as with ``padding_idx`` in a model alone (torch's
vmap rule kept only the first slot's padding row out). Measured on 2 shared
cores (V = 2000, D = 64, 64x16 lookups, forward and backward): 1.02 / 5.7 / 43
ms at n = 8 / 32 / 128, against 1.28 / 8.4 / 62 ms for ``F.embedding`` on a
flat copy of the tables; with a padding index, under vmap at n = 32: 9.6
against 12.5 ms.

Two operators, both registered with torch (``torch.library.custom_op``), so
that vmap can dispatch to them:

* :func:`stacked_lookup`: every slot's table at once (``[n, V, D]``), the
  direct path's kernel and what :func:`lookup` becomes under vmap;
* :func:`lookup`: one model's lookup, ``F.embedding(idx, table)`` with the
  padding row out of the gradient; the stack's template embeddings call it
  (:mod:`.stacked_embedding`), and vmap over a stacked table runs
  :func:`stacked_lookup` instead (the vmap rule below).

Both backwards are differentiable ops, so second derivatives (a gradient
penalty) work too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["gather_rows", "lookup", "slot_rows", "stacked_lookup"]


def _gather(tables: torch.Tensor, idx: torch.Tensor, per_slot: bool) -> torch.Tensor:
    n = tables.shape[0]
    slots = torch.arange(n, device=tables.device).view(n, *([1] * (idx.dim() - per_slot)))
    return tables[slots, idx]


@torch.library.custom_op("ray_modelbatch::stacked_lookup", mutates_args=())
def stacked_lookup(tables: torch.Tensor, idx: torch.Tensor, per_slot: bool, pad: int) -> torch.Tensor:
    """``out[s] = tables[s][idx[s]]`` (``idx`` ``[n, ...]`` when ``per_slot``, else one ``idx`` for every
    slot): ``[n, *idx_shape, D]``; rows at ``pad`` (>= 0) get no gradient."""
    return _gather(tables, idx, per_slot)


@stacked_lookup.register_fake
def _(tables: torch.Tensor, idx: torch.Tensor, per_slot: bool, pad: int) -> torch.Tensor:
    return tables.new_empty(tables.shape[0], *(idx.shape[1:] if per_slot else idx.shape), tables.shape[-1])


def _setup_stacked(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    tables, idx, per_slot, pad = inputs
    ctx.save_for_backward(idx)
    ctx.table, ctx.per_slot, ctx.pad = tuple(tables.shape), per_slot, pad


def _stacked_backward(ctx: Any, go: torch.Tensor) -> tuple[Any, ...]:
    (idx,) = ctx.saved_tensors
    n, v, d = ctx.table
    return _rows_grad(slot_rows(idx, n, v, ctx.per_slot), go, n * v, v, ctx.pad).view(n, v, d), None, None, None


stacked_lookup.register_autograd(_stacked_backward, setup_context=_setup_stacked)


class _StackedRows(torch.autograd.Function):
    """:func:`stacked_lookup` as a plain autograd ``Function``: the same forward and backward, for the direct
    path, where no vmap needs the registered operator. A custom operator's first call imports ``torch._dynamo``
    (its kernel is wrapped to skip Dynamo): 0.8 CPU-s at a slot host's first attach of a model with an
    embedding, on the engine thread (the ported LSTM script's first attach took 1.4 s)."""

    @staticmethod
    def forward(ctx: Any, tables: torch.Tensor, idx: torch.Tensor, per_slot: bool, pad: int) -> torch.Tensor:
        _setup_stacked(ctx, (tables, idx, per_slot, pad), None)
        return _gather(tables, idx, per_slot)

    @staticmethod
    def backward(ctx: Any, go: torch.Tensor) -> tuple[Any, ...]:
        return _stacked_backward(ctx, go)


def gather_rows(tables: torch.Tensor, idx: torch.Tensor, per_slot: bool, pad: int) -> torch.Tensor:
    """:func:`stacked_lookup` outside vmap (the direct path's kernel), without the operator's dispatch."""
    return _StackedRows.apply(tables, idx, per_slot, pad)


@torch.library.custom_op("ray_modelbatch::lookup", mutates_args=())
def lookup(table: torch.Tensor, idx: torch.Tensor, pad: int) -> torch.Tensor:
    """``F.embedding(idx, table)`` of one model, with the rows at ``pad`` (>= 0) out of the gradient."""
    return F.embedding(idx, table)


@lookup.register_fake
def _(table: torch.Tensor, idx: torch.Tensor, pad: int) -> torch.Tensor:
    return table.new_empty(*idx.shape, table.shape[-1])


def _setup_lookup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    table, idx, pad = inputs
    ctx.save_for_backward(idx)
    ctx.rows, ctx.pad = table.shape[0], pad


def _lookup_backward(ctx: Any, go: torch.Tensor) -> tuple[Any, ...]:
    (idx,) = ctx.saved_tensors
    return _rows_grad(idx, go, ctx.rows, ctx.rows, ctx.pad), None, None


lookup.register_autograd(_lookup_backward, setup_context=_setup_lookup)


@lookup.register_vmap
def _lookup_vmap(info: Any, in_dims: tuple, table: torch.Tensor, idx: torch.Tensor, pad: int) -> tuple:
    """Under vmap: one table per slot reads the stacked tables in place (:func:`stacked_lookup`)."""
    table_dim, idx_dim = in_dims[0], in_dims[1]
    if table_dim is None:  # one table, a batch of indices: a plain lookup of all of them
        return lookup(table, idx, pad), idx_dim
    tables = table.movedim(table_dim, 0)
    if idx_dim is not None:
        idx = idx.movedim(idx_dim, 0)
    return stacked_lookup(tables, idx, idx_dim is not None, pad), 0


def slot_rows(idx: torch.Tensor, n: int, v: int, per_slot: bool) -> torch.Tensor:
    """``idx`` (``[n, ...]`` per slot, or shared) as rows of the slots' tables stacked into ``[n*v, ...]``."""
    base = torch.arange(0, n * v, v, device=idx.device)
    return idx + base.view(n, *([1] * (idx.dim() - per_slot)))


def _rows_grad(rows: torch.Tensor, go: torch.Tensor, count: int, v: int, pad: int,
               index_add: bool | None = None) -> torch.Tensor:
    """The ``[count, D]`` gradient of a table whose rows ``rows`` were looked up with gradient ``go``; rows
    that are ``pad`` modulo ``v`` (each slot's padding row) get none.

    ``index_add`` (default: on a CPU) adds the rows with one ``index_add``: torch's CPU kernel's sums in its
    order (tested), 3.3 against 4.1 ms at n = 32. Elsewhere torch's own embedding backward runs: an
    ``index_add`` there adds atomically, in an order that changes from run to run.
    """
    rows = rows.reshape(-1)
    go = go.reshape(rows.numel(), -1)
    if go.device.type == "cpu" if index_add is None else index_add:
        grad = torch.zeros(count, go.shape[1], dtype=go.dtype, device=go.device).index_add_(0, rows, go)
    else:
        grad = torch.ops.aten.embedding_dense_backward(go, rows.long(), count, -1, False)
    if pad >= 0:  # what the padding rows summed is dropped: the other rows' sums are as they were, bit for bit
        grad.view(count // v, v, -1)[:, pad] = 0
    return grad
