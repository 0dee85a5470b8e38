"""SweepProgress: one line of live progress per update, for a sweep of batched trials.

Tune's own reporters print a table of every trial, which for a sweep of
hundreds of short trials is thousands of lines, and they cannot see the slot
hosts. This is a plain Tune ``Callback`` (pass it in ``RunConfig(callbacks=[...])``,
with ``verbose=0`` to silence Tune's tables) that prints, every ``every_s``
seconds and once at the end::

    [  12s] trials 18 done, 16 running, 30 pending | host0 14/16 slots, busy 97% | best val_loss 0.0614 (3f2a1_00007)

The host figures come from the experiment's registry with a short timeout,
so a busy registry never holds up Tune's loop (the line then keeps the
previous figures). Imports no torch.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import ray
from ray.tune import Callback

from .registry import NAMESPACE, registry_name


class SweepProgress(Callback):
    """Print trials done/running/pending, each host's busy slots and busy fraction, and the best metric.

    Args:
        trainable: what :func:`~ray_modelbatch.tune.batched_trainable` returned (for the host
            figures); None prints the trial counts and the best metric only.
        metric, mode: the metric to track (default: ``val_loss``, ``"min"``, or
            ``train_loss`` when there is no validation).
        every_s: seconds between lines.
        file: where to print (default stdout).
    """

    ASK_AHEAD_S = 0.5  # how long before a line the hosts' figures are asked for

    def __init__(self, trainable: Any = None, metric: str | None = None, mode: str = "min",
                 every_s: float = 5.0, file: IO[str] | None = None):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.experiment = getattr(trainable, "_experiment", None)
        self.metric, self.mode, self.every_s = metric, mode, float(every_s)
        self.file = file
        self.best: tuple[float, str] | None = None
        self.t0 = time.monotonic()
        self._last = 0.0
        self._hosts: list[dict] = []
        self._pending_stats: Any = None

    def setup(self, **info: Any) -> None:
        self.t0 = time.monotonic()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        metric = self.metric or ("val_loss" if "val_loss" in result else "train_loss")
        value = result.get(metric)
        if not isinstance(value, (int, float)) or value != value:  # missing or NaN
            return
        self.metric = metric
        if self.best is None or (value < self.best[0] if self.mode == "min" else value > self.best[0]):
            self.best = (float(value), trial.trial_id)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        since = time.monotonic() - self._last
        if since >= self.every_s:
            self._print(trials)
        elif since >= self.every_s - self.ASK_AHEAD_S and self._pending_stats is None:
            self._ask_hosts()  # so that the next line shows figures of now, not of the line before

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._pending_stats = None  # asked before the hosts' last work: ask again
        self._print(trials, final=True)

    # ------------------------------------------------------------- internals
    def _poll_hosts(self, wait_s: float) -> None:
        """Refresh the host figures without blocking Tune's loop for more than ``wait_s``."""
        if self.experiment is None or not ray.is_initialized():
            return
        try:
            if self._pending_stats is None:
                self._ask_hosts()
            if self._pending_stats is None:
                return
            ready, _ = ray.wait([self._pending_stats], timeout=wait_s)
            if ready:
                ref, self._pending_stats = self._pending_stats, None
                self._hosts = ray.get(ref)
        except (ValueError, ray.exceptions.RayError):  # no registry (yet, or any more)
            self._pending_stats = None

    def _ask_hosts(self) -> None:
        """Send the registry a request for the hosts' figures (answered by the time the next line prints)."""
        if self.experiment is None or not ray.is_initialized():
            return
        try:
            registry = ray.get_actor(registry_name(self.experiment), namespace=NAMESPACE)
            self._pending_stats = registry.stats.remote()
        except (ValueError, ray.exceptions.RayError):  # no registry (yet, or any more)
            self._pending_stats = None

    def _print(self, trials: list, final: bool = False) -> None:
        self._last = time.monotonic()
        self._poll_hosts(wait_s=1.0 if final else 0.05)
        count: dict[str, int] = {}
        for t in trials:
            count[t.status] = count.get(t.status, 0) + 1
        parts = [f"trials {count.get('TERMINATED', 0)} done, {count.get('RUNNING', 0)} running, "
                 f"{count.get('PENDING', 0)} pending"]
        for status in ("PAUSED", "ERROR"):
            if count.get(status):
                parts[0] += f", {count[status]} {status.lower()}"
        for h in self._hosts:
            name = str(h.get("host", "host")).rsplit(":", 1)[-1]
            parts.append(f"{name} {h.get('attached', 0)}/{h.get('capacity', 0)} slots, "
                         f"busy {h.get('busy_fraction', 0.0):.0%}")
        if self.best is not None:
            parts.append(f"best {self.metric} {self.best[0]:.4g} ({self.best[1]})")
        line = f"[{time.monotonic() - self.t0:5.0f}s] " + " | ".join(parts)
        print(line, file=self.file or sys.stdout, flush=True)


__all__ = ["SweepProgress"]
