"""Parameter groups, still per slot: a subset of the parameters with its own weight decay and lr multiplier.

The transformer recipe (no weight decay on biases and norm weights, a smaller
learning rate for some layers) is written in torch with param groups. Here a
group has two sides:

* its *membership* (which parameters it holds) and the keys it sets are the
  same for every slot of an optimizer: they shape the update. They are fixed
  once given (at construction, or by the first ``set_hparams`` that names
  groups) and a different membership is refused;
* its *values* (``weight_decay``, ``lr_scale``) are per-slot hyperparameters
  like every other: one float64 ``[S]`` column each, named
  ``param_groups[k].<key>``, changed by ``set_hparams``, carried by
  checkpoints and PBT copies, searched by Tune.

The update computes the per-slot coefficients once per group (a few ``[n]``
ops each), with the group's weight decay and ``lr * lr_scale``: torch's
per-group formulas. Those that involve the learning rate or the weight decay
become a ``[n, G + 1]`` table (column 0: the parameters in no group), and
every column of a flat ``[S, P]`` buffer takes its group's entry
(:meth:`ColumnGroups.pick`: nothing to do inside a run of one group's
parameters, else ``G + 1`` elementwise passes, or selects fused into the
compiled update). So the kernel count depends neither on S nor on how many
parameter tensors a group holds (splitting the buffer into per-group column
ranges would cost one update per run of parameters: biases and weights
alternate), and coefficients that involve neither stay ``[n, 1]`` columns.

Groups set ``weight_decay`` and ``lr_scale`` only. Hyperparameters that
switch a kernel path on (``amsgrad``, ``nesterov``, ``centered``) cannot
differ by column in one pass, and the smooth ones (betas, eps, momentum)
would need their coefficients declared per optimizer like
``LR_COEFFICIENTS``; the transformer recipe needs neither.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from ..errors import HyperparameterError
from .hparams import HParam, nonneg

# What a group may set. ``lr_scale`` multiplies the slot's (scheduled) learning rate, so a
# schedule or plateau rule moves every group together, as torch's schedulers move every group.
GROUP_HPARAMS: dict[str, HParam] = {
    "weight_decay": nonneg("weight_decay"),
    "lr_scale": HParam(1.0, lambda v: (v >= 0) & torch.isfinite(v), "lr_scale must be a finite number >= 0"),
}

# Coefficients of the weight decay itself (see decay.py): "decay" = 1 - lr * wd also involves the lr.
DECAY_COEFFICIENTS = ("wd", "decay")


def column(k: int, key: str) -> str:
    """The name of group ``k``'s hyperparameter column (as it appears in error messages)."""
    return f"param_groups[{k}].{key}"


@dataclass(frozen=True)
class GroupLayout:
    """Which parameters each group holds and which keys it sets: what must be equal in every slot."""

    members: tuple[tuple[str, ...], ...]
    keys: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.members)

    def columns(self) -> Iterator[tuple[int, str, str]]:
        """``(group, key, column name)`` for every value a group sets."""
        for k, keys in enumerate(self.keys):
            for key in keys:
                yield k, key, column(k, key)

    def sets(self, key: str) -> bool:
        return any(key in keys for keys in self.keys)

    def plain(self) -> list[dict[str, list[str]]]:
        """The layout as lists of strings (for ``state_dict``)."""
        return [{"params": list(m), "keys": list(k)} for m, k in zip(self.members, self.keys)]

    @classmethod
    def from_plain(cls, groups: Sequence[Mapping[str, Any]]) -> "GroupLayout":
        return cls(tuple(tuple(g["params"]) for g in groups), tuple(tuple(g["keys"]) for g in groups))

    def describe(self) -> str:
        """One line: the groups' sizes and keys (the fix of a mismatch names both layouts)."""
        return "[" + ", ".join(f"{len(m)} params setting {list(k)}" for m, k in zip(self.members, self.keys)) + "]"


NO_GROUPS = GroupLayout((), ())

MAX_GROUPS = 255
"""Groups of one optimizer at most: a column's group is held exactly in any float dtype's 8-bit mantissa."""


def _named_parameters(mb: Any) -> list[tuple[str, torch.Tensor]]:
    """Every parameter the optimizer updates, by name, as slot 0's tensor (for predicates: shape, ndim)."""
    out = []
    for g in mb.groups.values():
        data = g.data
        for name, offset, shape in zip(g.names, g.offsets, g.shapes):
            size = int(torch.Size(shape).numel())
            out.append((name, data[0, offset: offset + size].view(shape).detach() if data.shape[0] else
                        torch.empty(shape, dtype=data.dtype, device="meta")))
    return out


def _matcher(k: int, params: Any, names: list[str], prefix: str) -> Callable[[str, torch.Tensor], bool]:
    """The membership test of group ``k``: a predicate, or a list of names (checked against the model's)."""
    if callable(params):
        return params
    wanted = [params] if isinstance(params, str) else list(params) if isinstance(params, (list, tuple, set)) else None
    if wanted is None or not all(isinstance(n, str) for n in wanted):
        raise HyperparameterError(
            f"param_groups[{k}]['params'] must be a list of parameter names or a predicate (name, param) -> bool, "
            f"got {type(params).__name__}: a fused optimizer holds no per-model tensors to point at.")
    known = set(names)
    full = {n if n in known else prefix + n for n in wanted}
    unknown = sorted(n for n in full if n not in known)
    if unknown:
        raise HyperparameterError(
            f"param_groups[{k}] names parameters this optimizer does not update: {unknown[:3]}; its parameters "
            f"are {names[:6]}{' ...' if len(names) > 6 else ''} (a frozen or missing parameter cannot be grouped).")
    return lambda name, _p: name in full


def resolve(spec: Sequence[Mapping[str, Any]] | None, mb: Any) -> tuple[GroupLayout, list[dict[str, Any]]]:
    """The layout and the values of ``param_groups=[{"params": ..., key: value}, ...]`` over ``mb``'s parameters.

    ``params`` is a list of parameter names (for a part of a model, with or
    without the part's prefix) or a predicate ``(name, param) -> bool``, called
    with each parameter's full name and slot 0's tensor of it (``p.ndim < 2``
    selects biases and norm weights). Values stay as given (a float, or one
    per slot); the optimizer broadcasts them.
    """
    if spec is None:
        return NO_GROUPS, []
    if isinstance(spec, Mapping) or not isinstance(spec, (list, tuple)):
        raise HyperparameterError(
            "param_groups must be a list of dicts, e.g. [{'params': lambda name, p: p.ndim < 2, 'weight_decay': "
            f"0.0}}], got {type(spec).__name__}.")
    if len(spec) > MAX_GROUPS:
        raise HyperparameterError(f"param_groups has {len(spec)} groups; at most {MAX_GROUPS} are supported "
                                  "(merge groups that share their values).")
    named = _named_parameters(mb)
    names = [n for n, _ in named]
    part = getattr(mb, "part", None)
    prefix = f"{part}." if isinstance(part, str) else ""
    members: list[tuple[str, ...]] = []
    keys: list[tuple[str, ...]] = []
    values: list[dict[str, Any]] = []
    owner: dict[str, int] = {}
    for k, group in enumerate(spec):
        if not isinstance(group, Mapping) or "params" not in group:
            raise HyperparameterError(f"param_groups[{k}] must be a dict with a 'params' entry (names or a "
                                      f"predicate (name, param) -> bool), got {group!r}.")
        extra = sorted(set(group) - {"params"} - set(GROUP_HPARAMS))
        if extra:
            hint = (" (use lr_scale: a multiple of the slot's lr, so schedules move every group)"
                    if "lr" in extra else "")
            raise HyperparameterError(f"param_groups[{k}] sets {extra}; a group sets only {sorted(GROUP_HPARAMS)}"
                                      f"{hint}.")
        match = _matcher(k, group["params"], names, prefix)
        mine = tuple(n for n, p in named if bool(match(n, p)))
        for n in mine:
            if n in owner:
                raise HyperparameterError(f"parameter {n!r} is in param_groups[{owner[n]}] and param_groups[{k}]; "
                                          "a parameter may belong to one group only.")
            owner[n] = k
        members.append(mine)
        keys.append(tuple(sorted(set(group) - {"params"})))
        values.append({key: group[key] for key in keys[-1]})
    return GroupLayout(tuple(members), tuple(keys)), values


@dataclass(frozen=True)
class ColumnGroups:
    """Which group each column of one flat ``[S, P]`` buffer belongs to (0: no group, ``k + 1``: group k).

    ``index`` (``[P]``, int64), ``ids`` (the same in the buffer's dtype) and
    ``onehot`` (``[G + 1, P]``, the buffer's dtype) are on the device;
    ``starts``/``run_groups`` list the runs of adjacent columns of one group on
    the host, so that a cache tile inside one run (most tiles of a large
    model: weight matrices are long runs) uses its group's ``[n, 1]`` column
    and picks nothing.
    """

    index: torch.Tensor
    ids: torch.Tensor
    onehot: torch.Tensor
    starts: tuple[int, ...]
    run_groups: tuple[int, ...]

    def select(self, table: torch.Tensor) -> torch.Tensor:
        """Each column's entry of ``table`` (``[K, n, G + 1]``) as ``[K, n, P]`` selects, for compiled code.

        The compiler fuses the selects into the update's loop, where each
        column loads its group once as a value of the buffer's dtype (``ids``),
        shared by every coefficient: vectorized compares and blends. An
        ``index_select`` loads an int64 index per column and coefficient
        instead, measured 2x slower, a uint8 copy of it 3x.
        """
        out = table[..., :1]
        for k in range(1, table.shape[-1]):
            out = torch.where(self.ids == k, table[..., k: k + 1], out)
        return out

    def pick(self, table: torch.Tensor, cols: slice, gather: bool) -> torch.Tensor:
        """Each column's entry of ``table`` (``[K, n, G + 1]``) for the columns ``cols``: ``[K, n, width]``.

        For the eager update (compiled code uses :meth:`select`). A range inside one
        run gives that group's ``[K, n, 1]`` column. Else ``gather`` (GPUs)
        indexes the table; eager CPU kernels run an ``index_select`` along the
        last dimension ~50x slower than an elementwise pass, so there the
        columns are summed from the one-hot rows, ``G + 1`` fast passes: exact,
        since each sum has one nonzero term, a product with 1 (coefficients are
        finite by construction).
        """
        size = self.index.numel()
        start, stop = cols.start or 0, min(size if cols.stop is None else cols.stop, size)
        run = bisect.bisect_right(self.starts, start) - 1
        end = self.starts[run + 1] if run + 1 < len(self.starts) else size
        if stop <= end:
            k = self.run_groups[run]
            return table[..., k: k + 1]
        if gather:
            return table.index_select(2, self.index[cols])
        onehot = self.onehot[:, cols]
        out = torch.mul(onehot[0], table[..., :1])
        for k in range(1, table.shape[-1]):
            out.addcmul_(onehot[k], table[..., k: k + 1])
        return out


def column_groups(layout: GroupLayout, mb: Any) -> dict[torch.dtype, ColumnGroups]:
    """The :class:`ColumnGroups` of each dtype's flat buffer of ``mb`` (a ModelBatch or a PartView)."""
    group_of = {n: k + 1 for k, names in enumerate(layout.members) for n in names}
    out = {}
    for dt, g in mb.groups.items():
        index = torch.zeros(g.numel, dtype=torch.long)
        starts: list[int] = []
        run_groups: list[int] = []
        for name, offset, shape in zip(g.names, g.offsets, g.shapes):
            k = group_of.get(name, 0)
            index[offset: offset + int(torch.Size(shape).numel())] = k
            if not run_groups or run_groups[-1] != k:
                starts.append(offset)
                run_groups.append(k)
        onehot = torch.nn.functional.one_hot(index, len(layout) + 1).t().to(dt).contiguous()
        out[dt] = ColumnGroups(index.to(mb.device), index.to(dt).to(mb.device), onehot.to(mb.device), tuple(starts),
                               tuple(run_groups))
    return out
