"""Batched trials' actor objects held by a process that serves them: what the trial server and a slot host share.

Why: a batched trial's actor holds no model and only forwards Tune's calls
(:class:`~ray_modelbatch.tune.trial_actor.SlotTrialActor`), so the driver runs
every trial as an object in one process (see :mod:`.shared_trials`). Two
processes can hold them:

* a sweep with one slot host, on the driver's node: **the host itself**
  (:class:`TrialTable`, on the host's Ray threads). A trial's calls to its slot are then plain Python calls,
  and the sweep has no process of its own for its trials. Measured on the MLP
  sweep of ``benchmarks/tune_sweep.py`` (2 cores), the separate server made 642
  Ray calls to the host and the registry for the driver's 650, and took 2.2-2.8
  of the run's 15 CPU-s (its start about 1.0 of them);
* otherwise the driver's **trial server** (:mod:`.trial_server`), an async actor
  that relays to whichever hosts hold the trials' slots, so that one host's
  death does not take the trials of the others with it.

Either keeps a real actor's guarantees: a trial's calls run one at a time in
the order the driver made them (a sequence number per trial: Ray orders neither
a threaded nor an async actor's tasks); a trial whose constructor failed raises
that error on every later call; ``stop``, ``__ray_terminate__`` and ``kill``
detach the trial and forget it.

Imports neither torch nor ``ray.tune``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ..errors import ModelBatchError
from .trial_actor import SlotTrialActor

logger = logging.getLogger(__name__)


class SharedTrial(SlotTrialActor):
    """A trial's actor as an object in a shared process: the same protocol, without process-wide side effects."""

    def _open_log_files(self, stdout_file: str | None, stderr_file: str | None) -> None:
        """Create the trial's log files (``RunConfig(log_to_file=...)``), not redirecting the shared process's output.

        A batched trial runs no user code in its actor (the slot host does), so
        there is no output of the trial's own to copy into them.
        """
        for name in (stdout_file, stderr_file):
            if name:
                open(self._log_path(name), "a").close()


class TrialGoneError(RuntimeError):
    """A call for a trial the process no longer holds (stopped, killed, or never made)."""


class TrialClasses:
    """The trainables' actor classes in this process: :class:`SharedTrial` with each one's spec and options."""

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}

    def get(self, payload: dict | None) -> type:
        if payload is None:
            raise TypeError("a trial's first call must carry its class (the driver sends it with __init__)")
        name = payload["name"]
        if name not in self._classes:
            self._classes[name] = type(payload["class_name"], (SharedTrial,), payload["attrs"])
        return self._classes[name]


def close_trial(key: str, trial: SharedTrial) -> None:
    """Free an ended trial's slot and close its log files (a no-op for a trial already stopped)."""
    try:
        trial.cleanup()
        trial._close_log_files()
    except Exception as exc:  # noqa: BLE001 - the host frees the slot when the lease ends anyway
        logger.debug("ending trial %s: %s", key, exc)


class Seat:
    """One trial in a serving process: its actor object and the turn of its calls."""

    def __init__(self) -> None:
        self.trial: SharedTrial | None = None
        self.error: BaseException | None = None  # the constructor failed: every later call raises it
        self.next_seq = 0

    def failed(self, exc: BaseException) -> None:
        """Keep the constructor's error, which the trial's next call raises. This library's own errors go
        without the frames they passed through: their message names the problem and the fix, and Tune prints
        the traceback once per trial (75 lines of the host's internals each, where one line says it all)."""
        if isinstance(exc, ModelBatchError):
            exc.__traceback__, exc.__cause__, exc.__suppress_context__ = None, None, True
        self.error = exc

    def ready(self, key: str, method: str, ended: set[str]) -> bool:
        """Whether ``method`` (not ``__init__``) is ``__ray_ready__``, which a made trial answers with True; raises
        what a call of a trial whose constructor failed, or that ended, raises."""
        if self.error is not None:
            raise self.error
        if self.trial is None or key in ended:
            raise TrialGoneError(f"trial actor {key} has ended (stopped or killed)")
        return method == "__ray_ready__"


class TrialTable:
    """Trials' actor objects served on the calling threads (a threaded actor's, e.g. a slot host's)."""

    def __init__(self) -> None:
        self._turn = threading.Condition()
        self._seats: dict[str, Seat] = {}
        self._ended: set[str] = set()  # keys of trials that were stopped or killed: their late calls fail at once
        self._classes = TrialClasses()

    def call(self, key: str, seq: int, method: str, args: tuple, kwargs: dict, payload: dict | None = None) -> Any:
        """Run ``method`` of trial ``key`` once its earlier calls have run; ``__init__`` makes the trial."""
        with self._turn:
            if key in self._ended:
                raise TrialGoneError(f"trial actor {key} has ended (stopped or killed)")
            seat = self._seats.setdefault(key, Seat())
            self._turn.wait_for(lambda: seat.next_seq == seq)
        try:
            return self._run(key, seat, method, args, kwargs, payload)
        finally:
            with self._turn:
                seat.next_seq += 1
                self._turn.notify_all()

    def _run(self, key: str, seat: Seat, method: str, args: tuple, kwargs: dict, payload: dict | None) -> Any:
        if method == "__init__":
            # Never raises: see TrialServer._run (the error is raised by the trial's next call, __ray_ready__)
            try:
                trial = self._classes.get(payload)(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - raised by the next call
                seat.failed(exc)
                return None
            if key in self._ended:  # killed while it was being made: it must not keep its slot
                close_trial(key, trial)
                return None
            seat.trial = trial
            return None
        if seat.ready(key, method, self._ended):
            return True
        if method == "__ray_terminate__":  # as the process would exit: detach, and forget the trial
            self._forget(key)
            close_trial(key, seat.trial)
            return None
        result = getattr(seat.trial, method)(*args, **kwargs)
        if method == "stop":  # Tune's graceful end of an actor: nothing is called on it afterwards
            self._forget(key)
        return result

    def kill(self, key: str) -> None:
        """End trial ``key`` now, as ``ray.kill`` ends a process: its slot is freed, later calls fail."""
        seat = self._forget(key)
        if seat is not None and seat.trial is not None:
            close_trial(key, seat.trial)

    def _forget(self, key: str) -> Seat | None:
        with self._turn:
            self._ended.add(key)
            return self._seats.pop(key, None)
