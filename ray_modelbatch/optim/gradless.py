"""Parameters that got no gradient are left as they are, as ``torch.optim`` leaves them.

``torch.optim`` skips a parameter whose ``.grad`` is None: no weight decay, no
moment update, no step. A model has such parameters whenever its training
forward does not reach them: a layer defined but unused, a head used only in
evaluation, a weight read through ``.detach()``. A stack's gradient buffer
holds zeros for them, which every optimizer here would otherwise treat as a
gradient of zero: weight decay would shrink them, and Adam's moments would
decay and keep moving them. So :meth:`VectorOptimizer.step` keeps their
columns of the parameters and of every per-parameter state buffer, and puts
them back after the update. That is exact for every optimizer, and costs a
copy of those columns only, only in steps that have them
(:attr:`ModelBatch.gradless <ray_modelbatch.ModelBatch.gradless>` says which).

Per-slot step counts still advance for the whole slot. ``torch.optim`` counts
steps per parameter, so a parameter that gets gradients only in some steps
would see a different Adam bias correction; a parameter that never gets one
(the cases above) is unaffected.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import torch


def columns(groups: Mapping[torch.dtype, Any], names: tuple[str, ...]) -> list[tuple[torch.dtype, int, int]]:
    """``(dtype, start, end)`` column ranges of the named parameters in each group's flat buffers (a group has
    ``names``, ``offsets`` and ``shapes``), adjacent ranges merged."""
    wanted, out = set(names), []
    for dt, g in groups.items():
        for name, offset, shape in zip(g.names, g.offsets, g.shapes):
            if name not in wanted:
                continue
            end = offset + int(torch.Size(shape).numel())
            if out and out[-1][0] == dt and out[-1][2] == offset:
                out[-1] = (dt, out[-1][1], end)
            else:
                out.append((dt, offset, end))
    return out


@contextlib.contextmanager
def kept(groups: Mapping[torch.dtype, Any], state: Mapping[torch.dtype, Mapping[str, torch.Tensor]],
         names: tuple[str, ...]) -> Iterator[None]:
    """Within this block the named parameters' columns may change; afterwards they hold what they held before,
    in the parameters and in every ``[S, P]`` state buffer."""
    ranges = columns(groups, names) if names else []
    saved = []
    for dt, a, b in ranges:
        numel = groups[dt].numel
        tensors = [groups[dt].data] + [v for v in state.get(dt, {}).values() if v.dim() == 2 and v.shape[1] == numel]
        saved.append([(t, a, b, t[:, a:b].clone()) for t in tensors])
    yield
    with torch.no_grad():
        for block in saved:
            for t, a, b, old in block:
                t[:, a:b].copy_(old)
