"""TensorBoard logging with one run per slot.

TensorBoard compares *runs*; a fused batch of S models is S experiments, so
each slot gets its own run directory (``logdir/slot_007``, or a name such as
a trial id) and its own ``tensorboardX.SummaryWriter``. Writers are created
lazily, on a slot's first log call, so a large batch whose slots mostly stop
early does not open hundreds of files up front. tensorboardX itself is
imported on first use too (it takes about a second), so importing the
package stays cheap for processes that never log.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter

__all__ = ["SlotWriter"]


class SlotWriter:
    """One tensorboardX ``SummaryWriter`` per slot, each in its own run directory.

    Args:
        logdir: parent directory of the runs.
        num_slots: only used to choose the zero padding of default names so
            they sort correctly (``slot_007`` up to 1000 slots).
        names: run directory names per slot (a sequence indexed by slot or a
            mapping ``{slot: name}``); slots without one get ``slot_NNN``.
        flush_secs: how often tensorboardX flushes pending events.
    """

    def __init__(self, logdir: str | os.PathLike, num_slots: int | None = None,
                 names: Sequence[str] | Mapping[int, str] | None = None, flush_secs: int = 30):
        self.logdir = os.fspath(logdir)
        self.width = max(3, len(str(max(int(num_slots or 0) - 1, 0))))
        self.flush_secs = flush_secs
        if names is None:
            self._names: dict[int, str] = {}
        elif isinstance(names, Mapping):
            self._names = {int(k): str(v) for k, v in names.items()}
        else:
            self._names = {i: str(v) for i, v in enumerate(names)}
        self._writers: dict[int, "SummaryWriter"] = {}

    def run_name(self, slot: int) -> str:
        """The run directory name of ``slot`` (relative to ``logdir``)."""
        return self._names.get(int(slot), f"slot_{int(slot):0{self.width}d}")

    def run_dir(self, slot: int) -> str:
        return os.path.join(self.logdir, self.run_name(slot))

    def writer(self, slot: int) -> "SummaryWriter":
        """The slot's SummaryWriter, created (with its directory) on first use."""
        slot = int(slot)
        w = self._writers.get(slot)
        if w is None:
            from tensorboardX import SummaryWriter
            w = SummaryWriter(logdir=self.run_dir(slot), flush_secs=self.flush_secs)
            self._writers[slot] = w
        return w

    def log(self, slot: int, metrics: Mapping[str, Any], step: int) -> None:
        """Write each ``{tag: value}`` as a scalar of the slot's run at ``step``; ``None`` values are skipped.

        Non-finite values are written as they are, so a diverging slot shows
        up in TensorBoard instead of silently missing points.
        """
        w = self.writer(slot)
        for tag, value in metrics.items():
            if value is None:
                continue
            w.add_scalar(tag, float(value), int(step))

    def log_hparams(self, slot: int, hparams: Mapping[str, Any], metrics: Mapping[str, Any] | None = None) -> None:
        """Record the slot's hyperparameters (and final metrics) for TensorBoard's HParams tab.

        Written into the slot's own run rather than a new sub-run (which is
        what ``SummaryWriter.add_hparams`` does), so the hyperparameters sit
        next to the slot's curves. Values that are not bool/str/number are
        stored as strings; non-finite metric values are dropped.
        """
        hp = {k: _hparam_value(v) for k, v in hparams.items()}
        mets = {k: float(v) for k, v in (metrics or {}).items() if v is not None and math.isfinite(float(v))}
        from tensorboardX.summary import hparams as hparams_summaries

        exp, ssi, sei = hparams_summaries(hp, mets)
        w = self.writer(slot)
        for summary in (exp, ssi, sei):
            w.file_writer.add_summary(summary)
        for k, v in mets.items():
            w.add_scalar(k, v)

    def reset_slot(self, slot: int, name: str | None = None) -> None:
        """Close the slot's run; the next log goes to ``name`` (e.g. a new trial reusing the slot)."""
        w = self._writers.pop(int(slot), None)
        if w is not None:
            w.close()
        if name is None:
            self._names.pop(int(slot), None)
        else:
            self._names[int(slot)] = str(name)

    def flush(self) -> None:
        for w in self._writers.values():
            w.flush()

    def close(self) -> None:
        """Flush and close every open writer."""
        for w in self._writers.values():
            w.close()
        self._writers.clear()

    def __enter__(self) -> "SlotWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _hparam_value(v: Any) -> bool | str | float:
    if isinstance(v, (bool, str)):
        return v
    try:
        f = float(v)  # ints, floats, 0-d tensors, numpy scalars
    except (TypeError, ValueError):
        return str(v)
    # The HParams plugin cannot filter or sort inf (e.g. max_grad_norm = inf,
    # "no clipping"), and tensorboardX warns about it: store it as text.
    return f if math.isfinite(f) else str(f)
