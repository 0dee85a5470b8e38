"""Every batched trial of a driver in one process: Tune's trial actors as objects of a shared server.

Why: a batched trial's actor holds no model; it only forwards Tune's calls to
its slot host. Yet each one is a Ray worker process, and on a small node
starting them is most of a sweep's cost: 16 trial processes take 6.7 s on a
2-core node at 0.80 CPU-s each (see :mod:`~ray_modelbatch.tune.trial_actor`),
61 MB each while they run. Here every trial's actor is a
:class:`~ray_modelbatch.tune.trial_actor.SlotTrialActor` object inside one
``TrialServer`` process per driver, which starts once (alongside the registry,
before the first trial) and serves every trial the sweep ever runs. A sweep
with one slot host has its trials served by that host instead, and no server
(:mod:`~ray_modelbatch.tune.trial_table`, which holds what the two share).

Each trial stays a real Tune trial: its own ID, results, checkpoints
(``<trial dir>/checkpoint_<index>``, written by the server as the trial
process would), log files and failures. The driver's side
(:mod:`~ray_modelbatch.tune.shared_trials`) gives Tune an actor handle per
trial whose calls arrive here with the trial's key and a sequence number, and
this server keeps a real actor's guarantees:

* **order**: a trial's calls run one at a time, in the order the driver made
  them (a sequence number per trial; Ray does not order an async actor's tasks);
* **isolation**: a trial whose constructor failed raises that error on every
  later call, as a dead actor would, and no other trial notices;
* **concurrency**: different trials' calls run at once (``train`` awaits the
  host's answer on the server's event loop; the other calls, which may block
  on files or the registry, get a pool thread each, made on demand), so one
  trial waiting for its next result never holds up another;
* **end**: ``stop`` (Tune's graceful end), ``__ray_terminate__`` and ``kill``
  detach the trial from its slot and forget it.

Imports neither torch nor ``ray.tune``.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import ray_compat
from .trial_table import Seat, TrialClasses, TrialGoneError, close_trial

logger = logging.getLogger(__name__)


class _Seat(Seat):
    """One trial in the server, with the turn of its calls on the server's event loop."""

    def __init__(self) -> None:
        super().__init__()
        self.turn = asyncio.Condition()


class TrialServer:
    """The Ray actor (async) that holds every batched trial's actor object of one driver."""

    MAX_THREADS = 4096  # threads are made on demand: about one per trial waiting on its host at once

    def __init__(self) -> None:
        ray_compat.quiet_blocking_get_warning()  # the trials' ray.get calls run on the pool's threads
        self._pool = ThreadPoolExecutor(max_workers=self.MAX_THREADS, thread_name_prefix="trial")
        self._seats: dict[str, _Seat] = {}
        self._ended: set[str] = set()  # keys of trials that were stopped or killed: their late calls fail at once
        self._classes = TrialClasses()

    async def trial_call(self, key: str, seq: int, method: str, args: tuple, kwargs: dict,
                         payload: dict | None = None) -> Any:
        """Run ``method`` of trial ``key`` once its earlier calls have run; ``__init__`` makes the trial."""
        if key in self._ended:
            raise TrialGoneError(f"trial actor {key} has ended (stopped or killed)")
        seat = self._seats.setdefault(key, _Seat())
        async with seat.turn:
            await seat.turn.wait_for(lambda: seat.next_seq == seq)
        try:
            return await self._run(key, seat, method, args, kwargs, payload)
        finally:
            async with seat.turn:
                seat.next_seq += 1
                seat.turn.notify_all()

    async def _run(self, key: str, seat: _Seat, method: str, args: tuple, kwargs: dict,
                   payload: dict | None) -> Any:
        loop = asyncio.get_running_loop()
        if method == "__init__":
            # Never raises: the driver drops this call's reference (as Ray's actor creation has none), and
            # an error in a dropped reference is printed again as Ray's "Unhandled error" traceback. The
            # error is kept and raised by the trial's next call, __ray_ready__, which Tune makes first.
            try:
                trial = await loop.run_in_executor(self._pool, lambda: self._classes.get(payload)(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - raised by the next call
                seat.failed(exc)
                return None
            if key in self._ended:  # killed while it was being made: it must not keep its slot
                await loop.run_in_executor(self._pool, close_trial, key, trial)
                return None  # its later calls fail: the key has ended
            seat.trial = trial
            return None
        if seat.ready(key, method, self._ended):
            return True
        if method == "__ray_terminate__":  # as the process would exit: detach, and forget the trial
            self._forget(key)
            await loop.run_in_executor(self._pool, close_trial, key, seat.trial)
            return None
        trial = seat.trial
        if method == "train" and not args and not kwargs:
            # The hot call (one per result): awaited on this loop, not on a pool thread that blocks in
            # ray.get, which saves two thread hand-offs a result (benchmarks/trial_server.py).
            return await trial.train_async()
        result = await loop.run_in_executor(self._pool, lambda: getattr(trial, method)(*args, **kwargs))
        if method == "stop":  # Tune's graceful end of an actor: nothing is called on it afterwards
            self._forget(key)
        return result

    async def trial_kill(self, key: str) -> None:
        """End trial ``key`` now, as ``ray.kill`` ends a process: its slot is freed, later calls fail."""
        seat = self._forget(key)
        if seat is not None and seat.trial is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, close_trial, key, seat.trial)

    def _forget(self, key: str) -> _Seat | None:
        self._ended.add(key)
        return self._seats.pop(key, None)
