"""Every slot's per-step coefficients for the next few steps, computed in one batched pass.

Why: a fused step's per-slot arithmetic (the schedule, the bias corrections,
the masks of skipped slots) is a few dozen elementwise ops on ``[S]`` float64
tensors, each costing a kernel launch or a CPU dispatch of a few microseconds
for a handful of numbers. For the small models of a sweep that was about 50 of
the step's 110 ops (a digits MLP on one CPU core: ~0.2 of ~1.1 ms), and on a GPU
the same ops are launches in a step that is launch-bound.

The coefficients of a slot are a function of its hyperparameters, its plateau
multiplier and its step count ``t`` alone, and ``t`` grows by at most one per
step. So the window evaluates the optimizer's own formulas (``_lr``,
``_coefficients``, the parameter groups' tables) in one pass over a grid of
``t = steps + 0 .. N-1`` for every slot, each ``t`` twice: for a slot that
steps and for one that is skipped (non-finite gradients, an overflow,
``skip=``). A step then
picks each slot's row at its own ``t`` with one ``index_select`` and chooses
between the two with one ``where``: about six ops instead of fifty, without
reading anything back from the device.

Exactness: the grid runs the same float64 formulas on the same inputs, so a
value differs from the one-step form at most where float64 ``pow`` takes its
vectorized path in one form and its scalar loop tail in the other (now and
then the last bit of a float64, which the float32 update almost never sees;
the test of this module finds parameters and state bit-identical). A value
depends only on the slot's hyperparameters, its ``t`` and its position in the
stack, not on when the window was filled or on which other slots step with
it (the one-step form computes over the stepping rows only): ``N`` is a
multiple of the SIMD width, and the grid is filled in blocks of rows small
enough that torch runs each op on one thread, never splitting a row between
threads. A slot that rolls back, is restored or is copied (PBT) reads the
same numbers again.

Validity: the window is refilled after ``N`` steps, and at once when anything
it was computed from changes: new hyperparameters (``_push`` makes a new
matrix), a resized stack (new tensors), or an in-place write to the step counts
or plateau multipliers by anyone but the step itself (a reset slot, a loaded
checkpoint, a snapshot restored by run-ahead's rollback, ``plateau_step``),
seen through the tensors' version counters, which every in-place write bumps.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

WINDOW_STEPS = 32
"""Steps per window. A multiple of 8 (AVX-512's float64 lanes) so that no grid element takes a scalar tail;
a refill costs about one step's worth of coefficient ops, on ``[S, 2 x 32]`` instead of ``[S]``."""

FILL_ROWS = 256
"""Slots per block of a fill: each op then has at most 256 x 64 elements, below torch's 32,768-element grain,
so it runs on one thread (see the module docstring)."""


class CoefficientWindow:
    """The coefficients of every slot for its next :data:`WINDOW_STEPS` steps (see the module docstring).

    ``derive(hp, steps, okf)`` is the optimizer's per-step arithmetic: it
    returns ``(lr, coefficients, tables)``, the learning rate, the per-slot
    coefficients by name and the parameter groups' ``[n, G + 1]`` tables,
    each broadcastable against ``steps``. Non-tensor coefficients are flags,
    the same for every slot.
    """

    def __init__(self, steps_per_window: int = WINDOW_STEPS):
        self.n = int(steps_per_window)
        self._inputs: list[tuple[torch.Tensor, int]] | None = None  # what the window was filled from
        self._used = 0

    @staticmethod
    def _inputs_of(hp_mat: torch.Tensor, steps: torch.Tensor,
                   scalars: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        # The tensors themselves, not their ids: a freed tensor's id may come back on a new one.
        return [(t, t._version) for t in (hp_mat, steps, *(scalars[k] for k in sorted(scalars)))]

    def _valid(self, now: list[tuple[torch.Tensor, int]]) -> bool:
        return (self._inputs is not None and self._used < self.n and len(now) == len(self._inputs)
                and all(a is b and va == vb for (a, va), (b, vb) in zip(now, self._inputs)))

    def _fill(self, hp: Mapping[str, torch.Tensor], steps: torch.Tensor,
              derive: Callable[..., tuple[torch.Tensor, dict[str, Any], dict[str, torch.Tensor]]]) -> None:
        s, n = steps.shape[0], self.n
        blocks = [self._fill_rows({k: v[lo:lo + FILL_ROWS] for k, v in hp.items()}, steps[lo:lo + FILL_ROWS], derive)
                  for lo in range(0, s, FILL_ROWS)]
        both = torch.cat([b[0] for b in blocks])  # [S, 2N, K]
        # [K, S*N, 1]: a lookup's index_select gives the [K, n, 1] columns an update broadcasts as they are
        self.ok_table = both[:, :n].reshape(s * n, both.shape[2]).t().contiguous().unsqueeze(-1)
        self.skip_table = both[:, n:].reshape(s * n, both.shape[2]).t().contiguous().unsqueeze(-1)
        self.names, self.table_names, self.groups, self.flags = blocks[0][1:]
        # a slot's row for its step count t: s * N + (t - t at the fill)
        self.shift = torch.arange(s, dtype=steps.dtype, device=steps.device) * n - steps

    def _fill_rows(self, hp: Mapping[str, torch.Tensor], steps: torch.Tensor,
                   derive: Callable[..., tuple[torch.Tensor, dict[str, Any], dict[str, torch.Tensor]]]) -> tuple:
        """``[rows, 2N, K]``: columns 0..N-1 for a slot that steps, N..2N-1 for a skipped one; and the layout."""
        s, n = steps.shape[0], self.n
        t = steps.unsqueeze(1) + torch.arange(n, dtype=steps.dtype, device=steps.device)  # [rows, N]: each slot's t
        grid = torch.cat([t, t], dim=1)
        okf = torch.cat([torch.ones_like(t), torch.zeros_like(t)], dim=1)
        lr, coefficients, tables = derive({k: v.unsqueeze(1) for k, v in hp.items()}, grid, okf)
        names = [k for k, v in coefficients.items() if isinstance(v, torch.Tensor)]
        cols = [coefficients[k].expand(s, 2 * n) for k in names] + [lr.expand(s, 2 * n)]
        table_names = list(tables)
        for k in table_names:  # [rows, G + 1, 2N] (or [rows, G + 1, 1] where constant) -> G + 1 columns
            v = tables[k]
            cols.extend(v.expand(s, v.shape[1], 2 * n).unbind(1))
        groups = tables[table_names[0]].shape[1] if table_names else 0
        flags = {k: v for k, v in coefficients.items() if not isinstance(v, torch.Tensor)}
        return torch.stack(cols, dim=-1), names, table_names, groups, flags

    def lookup(self, hp_mat: torch.Tensor, hp: Mapping[str, torch.Tensor], steps: torch.Tensor,
               scalars: Mapping[str, torch.Tensor], rows: torch.Tensor | None, row_steps: torch.Tensor,
               ok: torch.Tensor, any_skipped: bool | None,
               derive: Callable[..., tuple[torch.Tensor, dict[str, Any], dict[str, torch.Tensor]]]
               ) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, Any], torch.Tensor | None, list[str]]:
        """This step's coefficients for ``rows`` (None: every slot) at their step counts ``row_steps``.

        ``hp``/``steps``/``scalars`` are the whole stack's (read when the window
        is refilled); ``ok`` says which rows step; ``any_skipped`` is whether
        any row is skipped where that is known for free (CPU), else None.
        Returns ``(values [K, n, 1], lr [n, 1], names, flags, group table [Kg, n, G + 1] or None, table names)``.
        """
        if not self._valid(self._inputs_of(hp_mat, steps, scalars)):
            self._fill({**hp, **scalars}, steps, derive)
            self._inputs, self._used = self._inputs_of(hp_mat, steps, scalars), 0
        shift = self.shift if rows is None else self.shift.index_select(0, rows)
        at = (row_steps + shift).long()
        values = self.ok_table.index_select(1, at)  # [K, n, 1]
        if any_skipped is None or any_skipped:
            values = torch.where(ok.view(1, -1, 1), values, self.skip_table.index_select(1, at))
        k = len(self.names)
        table = None
        if self.table_names:
            table = values[k + 1:, :, 0].unflatten(0, (len(self.table_names), self.groups)).transpose(1, 2)
        return values[:k], values[k], self.names, self.flags, table, self.table_names

    def stepped(self, steps: torch.Tensor) -> None:
        """The step itself wrote the new step counts: the window stays valid, one step further along."""
        if self._inputs is not None and self._inputs[1][0] is steps:
            self._inputs[1] = (steps, steps._version)
            self._used += 1
        else:
            self._inputs = None
