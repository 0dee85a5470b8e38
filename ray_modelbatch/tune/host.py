"""The slot host: one Ray actor per GPU (or node) that trains many Tune trials as fused stacks.

**Run-ahead.** Every held slot steps on every fused step, whether or not its
trial has a request out: a slot may complete up to ``run_ahead`` iterations
past the last result its trial has taken. Finished iterations' results wait
in the trial's buffer, so the proxy's next ``step()`` is answered at once. The
device never idles while Tune's controller turns results around one trial at
a time; with ``run_ahead=0`` a slot steps only while its trial waits (the
behaviour of a plain request-response host).

**Exact.** A slot's training is a function of its own state and its seeded
data stream, whichever slots step beside it (see
:mod:`ray_modelbatch.slot_group`). The group keeps each slot's full state at
its last ``run_ahead + 1`` iteration boundaries, and the host tells it which
boundary Tune knows: the last result the trial took. So a save exports that
boundary's state, a stop discards the extra work, and a restore (a resumed
pause, a PBT exploit) overwrites it. Every result and every checkpoint is the
one a host without run-ahead would give.

A single worker thread loops: it first serves control commands (attach,
detach, save, restore), so PBT's blocking save in the driver is answered
between two fused steps, then runs one fused step per stack over its
runnable slots, and evaluates the slots that finished an iteration.

Proxies hand the host a *lease*: their own actor handle. The host keeps one
cheap ``__ray_ready__`` probe in flight per proxy; when a proxy process dies
without ``cleanup()`` (a SIGKILL, a dead driver), the probe fails and the host
frees the slot on its next check. A proxy that is merely busy leaves its
probe pending, which counts as alive.

This module imports torch only inside the actor (``SlotHost.__init__``), so a
registry can create hosts without paying for torch.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import zlib
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from ..cpu_memory import big_tensor_policy, use_huge_pages
from ..errors import SweepSetupError
from .cpu_spread import StepCostMeter
from .shared_data import fetch

try:
    import resource
except ImportError:  # not a Unix
    resource = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


@dataclass
class _Attachment:
    """One proxy's hold on a slot: the Ray plumbing around the slot its group owns."""

    trial_id: str
    group: Any
    slot: int
    lease: Any  # the proxy's actor handle, or None (never freed by the lease check)
    probe: Any = None  # the lease's in-flight liveness probe
    results: collections.deque = field(default_factory=collections.deque)  # finished, not yet taken
    waiter: Future | None = None  # the proxy's step() waiting for the next result
    taken: int = 0  # iterations whose results the trial took since the slot was loaded: the boundary
    nonfinite_total: int = 0
    error: BaseException | None = None  # the slot failed; the next step() raises it
    moving_to: str | None = None  # the host this slot moves to once its trial took every result (see balance)
    config: dict | None = None  # the trial's config: a stack made later may take the slot (_gather_into)

    def runnable(self, run_ahead: int) -> bool:
        if self.error is not None:
            return False
        if self.moving_to is not None:  # finish the iteration it is in, start no other: nothing is thrown away
            return self.group.meter.steps[self.slot] > 0
        return len(self.results) < run_ahead or (self.waiter is not None and not self.results)


@dataclass
class _Stats:
    started: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0  # fused steps, evaluation, snapshots, results (and compacting a sparse stack)
    wait_s: float = 0.0  # nothing to do: every held slot is run_ahead results ahead, or none is held
    busy_cpu_s: float = 0.0  # the engine thread's CPU time during busy_s: the rest it waited for a core or the GIL
    busy_preempted: int = 0  # times the OS took the engine thread's core during busy_s (Linux; else 0)
    command_s: float = 0.0  # serving attach, detach, save and restore between fused steps
    # per command kind: [count, wall s, the engine thread's CPU s] (what command_s went to)
    commands: dict = field(default_factory=lambda: collections.defaultdict(lambda: [0, 0.0, 0.0]))
    housekeeping_s: float = 0.0  # lease checks and TensorBoard figures
    fused_steps: int = 0
    slot_steps: int = 0
    held_slot_steps: int = 0  # sum over fused steps of the slots the stepped stack held
    first_result_s: float | None = None  # seconds from the first attach to the first result
    first_attach: float | None = None
    # Wall-clock (time.time()) milestones of this host, for a sweep's time-to-first-result breakdown.
    init_at: float = field(default_factory=time.time)  # the host process runs its constructor
    ready_at: float | None = None  # torch imported, data() loaded: ready for trials
    first_attach_at: float | None = None
    first_result_at: float | None = None
    window_start: float = field(default_factory=time.monotonic)
    window_busy: float = 0.0
    window_wait: float = 0.0
    window_steps: int = 0
    window_stepped: int = 0
    window_held: int = 0
    max_held: int = 0  # high-water mark of attached + reserved trials
    moved_out: int = 0  # slots handed to another host (see balance)
    moved_in: int = 0  # slots that came from another host
    regrouped: int = 0  # slots that moved into a newer stack of this host that takes them (_gather_into)
    load_at: float = field(default_factory=time.monotonic)  # the last load() report: its window starts here
    load_busy: float = 0.0  # busy_s at that report
    refused: int = 0  # reservations refused because the host was full (Tune oversubscribed it)
    freed_by_lease: int = 0  # slots freed because the trial's process died without detaching


def trial_seed(trial_id: str, config: dict, key: str) -> int:
    """The trial's seed: ``config[key]`` if present, else stable from the trial ID."""
    if key in config and config[key] is not None:
        return int(config[key])
    return zlib.crc32(trial_id.encode()) & 0x7FFFFFFF


class SlotHost:
    """Owns the fused stacks of one device. Create it as a threaded Ray actor (see ``registry``)."""

    def __init__(self, spec_bytes: bytes, name: str, capacity: int | str, lease_check_s: float = 2.0,
                 stats_every_s: float = 5.0, profile_config: dict | None = None, max_slots: int = 256,
                 run_ahead: int = 2, threads: int | None = None, data_from: str | None = None,
                 node_share: int = 1, step_threshold_ms: float | None = None, gpu_share: int = 1,
                 move_slots: bool = True):
        init_at = time.time()
        _passive_openmp()  # before the spec (the user's functions) imports torch
        use_huge_pages()  # the engine thread's big tensors stay mapped (see cpu_memory.allocator_env)
        from ray import cloudpickle  # Ray's own copy: the package needs no separate cloudpickle

        from ..data import sweep_inputs

        # A host that cannot start reports why through ping(), in one line, instead of raising here:
        # an exception in an actor's constructor makes Ray abort the process with a C++ stack dump.
        self.start_error: str | None = None
        self.name = name
        try:
            self.spec = cloudpickle.loads(spec_bytes)
        except Exception as exc:  # noqa: BLE001 - e.g. a function the host's process cannot import
            self.spec = None
            if isinstance(exc, ModuleNotFoundError) and exc.name:  # the driver found it on a path of its own
                fix = (f"Ray's workers cannot import {exc.name!r}: ship it with ray.init(runtime_env={{'py_modules': "
                       f"[{exc.name}]}}) or runtime_env={{'working_dir': <its folder>}}, or install it.")
            else:
                fix = ("Define them at the top level of your script or in an importable module (a "
                       "functools.lru_cache-wrapped function in the script cannot be sent: cache in a global dict "
                       "instead).")
            self.start_error = (f"the trainable's functions could not be loaded in the slot host's process "
                                f"({type(exc).__name__}: {exc}). {fix}")
        try:
            self.device = _pick_device(self.spec.device if self.spec is not None else "cpu")
        except SweepSetupError as exc:
            self.device, self.start_error = _pick_device("cpu"), self.start_error or str(exc)
        if self.device.type == "cpu" and big_tensor_policy().startswith("none"):  # neither huge pages nor one arena
            logger.info("host %s: big tensors of the engine thread: %s", name, big_tensor_policy())
        self.node_id = ray.get_runtime_context().get_node_id()
        self.in_placement_group = ray.util.get_current_placement_group() is not None
        self.threads = _use_cpus(self.device, threads, self.node_id, node_share)
        self._fixed_threads = threads is not None or self.device.type != "cpu"  # set_threads leaves these
        self._want_threads: int | None = None  # applied by the engine thread between fused steps
        self.step_cost = StepCostMeter(step_threshold_ms)  # see cpu_spread
        self.run_ahead = int(run_ahead)
        self.move_slots = bool(move_slots)  # into stacks made later that take them (_gather_into)
        self.gpu_share = max(1, int(gpu_share))  # hosts on this GPU (hosts_per_gpu): each plans for its part
        self.capacity, self.capacity_fit = 0, None
        try:
            if self.spec is None:
                raise RuntimeError("no spec")
            self.data = _load_data(self.spec, self.device, sweep_inputs, self._driver_data(data_from))
            if capacity == "auto":
                fit = self._profile(profile_config or {}, max_slots)
                self.capacity, self.capacity_fit = fit.slots, fit.describe()
                logger.info("host %s: %s", name, self.capacity_fit)
            else:
                self.capacity = int(capacity)
            # The host's TensorBoard writer (see _log_stats), loaded now rather than on the engine thread in
            # the middle of the sweep: importing tensorboardX (and the boto3 it pulls in) took 0.13-0.2 s there.
            import tensorboardX  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - every start failure goes to the registry as one line
            said = str(exc) if isinstance(exc, SweepSetupError) else f"{type(exc).__name__}: {exc}"
            self.start_error = self.start_error or said
        self.groups: dict[str, Any] = {}
        self._forward_paths: dict[str, str] = {}  # stack -> "direct" or "vmap: why" (SlotGroup.forward_path)
        self.trials: dict[str, _Attachment] = {}
        self._warned_keys: set[str] = set()
        self._stack_keys: set[tuple] = set()  # config paths the model, batch size or optimizer read: _attach
        self._unpadded: set[str] = set()  # model families whose padded copies are not exact: _new_stack
        self._padded_attaches = 0
        self.reserved: dict[str, float] = {}  # key -> when reserved; see _check_leases
        self._lock = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._stop = False
        self._lease_check_s = lease_check_s
        self._stats_every_s = stats_every_s
        self._stats = _Stats(init_at=init_at, ready_at=time.time())
        self._events: collections.deque = collections.deque(maxlen=256)  # recent attach/detach, for stats()
        self._writer = None
        self._log_dir: str | None = None
        self._served: Any = None  # the trials' actor objects this host holds (trial_call), made on the first
        self._engine_tid: int | None = None  # the engine thread's OS id, once it runs (see _cpu_wait_s)
        self._thread = threading.Thread(target=self._loop, name=f"{name}-engine", daemon=True)
        self._thread.start()

    def _driver_data(self, registry: str | None) -> Any:
        """The data the driver loaded for this experiment (:mod:`~ray_modelbatch.tune.shared_data`), or None."""
        from .registry import NAMESPACE  # (the registry module imports this one)

        self.data_source, started = "host", time.monotonic()
        got = fetch(registry, NAMESPACE) if registry else None
        if got is None:
            return None
        self.data_source = f"driver (its data() took {got[1]:.2f}s; {time.monotonic() - started:.2f}s here)"
        return got[0]

    # ------------------------------------------------------------ public API
    def _profile(self, config: dict, max_slots: int) -> Any:
        """Slots of ``config``'s model that fit this host's device (see :mod:`ray_modelbatch.capacity`)."""
        import torch

        from ..capacity import MEMORY_FRACTION, THROUGHPUT_POINTS, profile_capacity
        from ..slot_group import SlotGroup

        def model() -> Any:
            torch.manual_seed(0)
            return _from_config(self.spec.model, "model", config)

        hparams = _from_config(self.spec.hparams, "hparams", config)
        build = SlotGroup.build_for_profile(self.spec, model, self.data, self.device, hparams, config=config)
        fraction = MEMORY_FRACTION / (self.gpu_share if self.device.type == "cuda" else 1)
        return profile_capacity(build, self.device, max_slots=max_slots, throughput_points=THROUGHPUT_POINTS,
                                fraction=fraction)

    def ping(self) -> dict:
        """Who and where this host is; the registry waits for it before handing out slots."""
        return {"name": self.name, "capacity": self.capacity, "capacity_fit": self.capacity_fit,
                "device": str(self.device), "node_id": self.node_id, "threads": self.threads,
                "gpu_share": self.gpu_share, "pid": os.getpid(), "in_placement_group": self.in_placement_group,
                "error": self.start_error}

    def kernel_bound(self) -> bool | None:
        """Whether this host's fused steps are mostly kernel time (see :mod:`.cpu_spread`); None until measured."""
        with self._lock:
            return self.step_cost.verdict

    def set_threads(self, threads: int) -> None:
        """Compute with ``threads`` torch threads from the next fused step on (another host joined this node);
        a count the user set with ``host_threads`` stays."""
        with self._lock:
            if not self._fixed_threads:
                self._want_threads = _machine_threads(threads)
                self._lock.notify_all()

    def reserve(self, key: str) -> bool:
        """Hold a slot for attachment ``key`` if there is room; called by the registry, atomically."""
        with self._lock:
            if key in self.trials or key in self.reserved:
                return True
            if len(self.trials) + len(self.reserved) >= self.capacity:
                self._stats.refused += 1
                return False
            self.reserved[key] = time.monotonic()
            self._stats.max_held = max(self._stats.max_held, len(self.trials) + len(self.reserved))
            return True

    def free_slots(self) -> int:
        with self._lock:
            return self.capacity - len(self.trials) - len(self.reserved)

    def attach(self, trial_id: str, config: dict, lease_box: list, log_dir: str | None = None,
               key: str | None = None) -> dict:
        """Give the trial a slot with fresh weights from its config and seed.

        ``key`` names this attachment (one per proxy ``setup``/``reset_config``;
        default: the trial ID). Every later call uses it. Tune may briefly run
        two proxies for one trial (it replaces a freshly started proxy by a
        cached one, and a paused trial's cached proxy still holds its slot);
        each then has its own slot, and the stale one's slot is freed when that
        proxy detaches or dies, without touching the live one.
        """
        if log_dir and log_dir != self._log_dir:
            self._call(lambda: self._use_log_dir(log_dir), "log dir")
        return self._call(lambda: self._attach(trial_id, config, lease_box[0], key or trial_id), "attach")

    def train(self, key: str) -> dict:
        """The attachment's next result: at once if its slot already finished that iteration.

        A slot marked to move (:meth:`release`) gets, once its trial took every
        finished result and the slot stands at that boundary, a move instead
        (see :mod:`.balance` and :meth:`_move_out`): its state and the host to continue on.
        """
        with self._lock:
            t = self.trials.get(key)
            if t is None:
                raise RuntimeError(f"attachment {key} has no slot on host {self.name}; the trial must attach first")
            if t.waiter is not None:
                raise RuntimeError(f"trial {t.trial_id} already has a step in flight on host {self.name}")
            if t.results:
                return self._take(t, t.results.popleft())
            if t.error is not None:
                raise t.error
            fut: Future = Future()
            t.waiter = fut
            self._lock.notify_all()
        return fut.result()

    def _take(self, t: _Attachment, result: dict) -> dict:
        """Hand a finished iteration's result to the trial (under the lock): its state becomes the boundary."""
        t.taken += 1
        self._lock.notify_all()  # the slot may run again
        return result

    def save(self, key: str) -> bytes:
        """The trial's slot state at the boundary Tune knows (the last result it took)."""
        def run() -> bytes:
            t = self._trial(key)
            return t.group.export(t.slot, t.taken)

        return self._call(run, "save")

    def restore(self, key: str, blob: bytes, config: dict, moved: dict | None = None) -> None:
        """Load a slot state: a checkpoint's bytes, or a slot that ``moved`` here from another host
        (``{"from": host, "nonfinite_total": n}``, see :mod:`.balance`)."""
        def run() -> None:
            t = self._trial(key)
            t.group.load(t.slot, blob, _from_config(self.spec.hparams, "hparams", config))
            with self._lock:
                t.results.clear()  # work done past the old boundary belongs to a state Tune left
                t.taken, t.error = 0, None
                if moved is not None:
                    t.nonfinite_total = int(moved.get("nonfinite_total", 0))
                    self._stats.moved_in += moved.get("from") != self.name
                    self._events.append({"t": time.time(), "event": "moved in", "trial": t.trial_id,
                                         "slot": t.slot, "stack": t.group.key, "from": moved.get("from")})

        return self._call(run, "restore")

    def load(self) -> dict:
        """How busy this host was since the last report, and what it holds: for the registry's
        :func:`~.balance.plan_move` (called once a second; answered at once, not by the engine thread)."""
        with self._lock:
            s, now = self._stats, time.monotonic()
            busy = (s.busy_s - s.load_busy) / max(now - s.load_at, 1e-6)
            s.load_at, s.load_busy = now, s.busy_s
            stacks: dict[str, int] = {}
            moving = 0
            for t in self.trials.values():
                if t.moving_to is not None:
                    moving += 1
                else:
                    stacks[t.group.key] = stacks.get(t.group.key, 0) + 1
            return {"name": self.name, "busy": min(busy, 1.0), "held": sum(stacks.values()) + len(self.reserved),
                    "free": self.capacity - len(self.trials) - len(self.reserved), "moving": moving,
                    "stacks": stacks}

    def release(self, receiver: str, receiver_stacks: list, count: int = 1) -> list[str]:
        """Mark up to ``count`` slots to move to host ``receiver`` (see :mod:`.balance`); returns their trials."""
        from .balance import pick_slots

        with self._lock:
            by_stack: dict[str, list[str]] = {}
            for key, t in self.trials.items():
                if t.moving_to is None and t.error is None:
                    by_stack.setdefault(t.group.key, []).append(key)
            picked = [self.trials[key] for key in pick_slots(by_stack, receiver_stacks, count)]
            for t in picked:
                t.moving_to = receiver
                self._events.append({"t": time.time(), "event": "releasing", "trial": t.trial_id, "slot": t.slot,
                                     "stack": t.group.key, "to": receiver})
            self._lock.notify_all()
            return [t.trial_id for t in picked]

    def _movable(self) -> list[tuple[str, _Attachment]]:
        """(Under the lock.) Slots marked to move whose trial waits for a result none of them has: each stands
        at the boundary its trial knows (a marked slot finishes the iteration it is in and starts no other)."""
        return [(key, t) for key, t in self.trials.items()
                if t.moving_to is not None and t.waiter is not None and not t.results and t.error is None
                and t.group.meter.steps[t.slot] == 0]

    def _move_out(self, key: str, t: _Attachment) -> None:
        """(Engine thread.) Answer the waiting ``step()`` of a movable slot with its state at the boundary and
        the host to go to, and free the slot (see :mod:`.balance`)."""
        from .balance import MOVE_KEY

        try:
            blob = t.group.export(t.slot, t.taken)
        except BaseException as exc:  # noqa: BLE001 - it cannot leave: the trial fails as a step would
            self._fail(t, exc)
            return
        with self._lock:
            waiter, t.waiter = t.waiter, None
            if t.moving_to == self.name:
                self._stats.regrouped += 1
            else:
                self._stats.moved_out += 1
        self._detach(key, f"it moved to {t.moving_to}")
        waiter.set_result({MOVE_KEY: {"to": t.moving_to, "blob": blob, "from": self.name,
                                      "nonfinite_total": t.nonfinite_total}})

    def detach(self, key: str) -> None:
        """Free the attachment's slot at once (it is masked out of the next fused step)."""

        def run() -> None:
            with self._lock:
                self.reserved.pop(key, None)
            self._detach(key, "the trial ended")

        return self._call(run, "detach")

    # --------------------------------------------- trials served here (see trial_table)
    def trial_call(self, key: str, seq: int, method: str, args: tuple, kwargs: dict,
                   payload: dict | None = None) -> Any:
        """Tune's call ``method`` of trial ``key``'s actor, an object held by this host (the sweep's only one).

        Runs on the calling Ray thread; the trial's own calls to its slot here
        are plain Python calls (:func:`~.slot_client.local_host`).
        """
        return self._served_trials().call(key, seq, method, args, kwargs, payload)

    def trial_kill(self, key: str) -> None:
        """``ray.kill`` of a served trial: detach it and forget it (see ``trial_table``)."""
        self._served_trials().kill(key)

    def _served_trials(self) -> Any:
        from .slot_client import serve_locally
        from .trial_table import TrialTable  # (it imports the registry, which imports this module)

        with self._lock:
            if self._served is None:
                self._served = TrialTable()
                serve_locally(ray.get_runtime_context().get_actor_id(), self)
            return self._served

    def stats(self) -> dict:
        with self._lock:
            s = self._stats
            wall = time.monotonic() - s.started
            paths = {"full": 0, "masked": 0, "gathered": 0, "stepped": 0, "computed": 0, "compacted": 0,
                     "released": 0, "evaluated": 0, "eval_rows": 0}
            for g in self.groups.values():
                for k in paths:
                    paths[k] += getattr(g.stats, k)
            return {
                "host": self.name,
                "device": str(self.device),
                "node_id": self.node_id,
                "pid": os.getpid(),
                "threads": self.threads,
                "gpu_share": self.gpu_share,
                "kernel_bound": self.step_cost.verdict,  # see cpu_spread
                "rnn_kernels": _rnn_kernels(),  # recurrent layers: torch's kernel per slot, or batched
                "step_cpu_ms": self.step_cost.median_ms,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),  # see _passive_openmp
                "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),  # see cpu_memory.allocator_env
                "big_tensors": big_tensor_policy(),
                "run_ahead": self.run_ahead,
                "data_source": getattr(self, "data_source", None),  # who ran data(): "host", or "driver (...)"
                "in_placement_group": self.in_placement_group,
                "capacity": self.capacity,
                "capacity_fit": self.capacity_fit,
                "attached": len(self.trials),
                "padded_attaches": self._padded_attaches,  # trials that joined a wider stack (padded_stacks)
                "reserved": len(self.reserved),
                "stacks": {
                    k: {"capacity": g.capacity, "used": g.used, "active": int(g.mb.active_slots.numel()),
                        "snapshot_mb": g.snapshots.nbytes() / 2**20, "forward": self._forward_paths.get(k)}
                    for k, g in self.groups.items()
                },
                "trials": {t.trial_id: t.slot for t in self.trials.values()},
                "events": list(self._events),
                "fused_steps": s.fused_steps,
                "slot_steps": s.slot_steps,
                "held_slot_steps": s.held_slot_steps,
                "stepped_fraction": s.slot_steps / s.held_slot_steps if s.held_slot_steps else 0.0,
                "step_paths": paths,
                "first_result_s": s.first_result_s,
                "milestones": {"init": s.init_at, "ready": s.ready_at, "first_attach": s.first_attach_at,
                               "first_result": s.first_result_at, "verdict": self.step_cost.verdict_at},
                "busy_s": s.busy_s,
                "wait_s": s.wait_s,
                "busy_cpu_s": s.busy_cpu_s,
                "busy_preempted": s.busy_preempted,
                "engine_cpu_wait_s": _cpu_wait_s(self._engine_tid),
                "command_s": s.command_s,
                "commands": {k: {"count": c, "wall_s": w, "cpu_s": cpu} for k, (c, w, cpu) in s.commands.items()},
                "housekeeping_s": s.housekeeping_s,
                "wall_s": wall,
                "busy_fraction": s.busy_s / wall if wall > 0 else 0.0,
                "max_held": s.max_held,
                "refused": s.refused,
                "freed_by_lease": s.freed_by_lease,
                "moved_out": s.moved_out,  # slots handed to another host, and taken from one (see balance)
                "moved_in": s.moved_in,
                "regrouped": s.regrouped,
            }

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(timeout=10)
        self._log_stats()  # the last window: a short sweep may have run entirely inside it
        if self._writer is not None:
            self._writer.close()

    # ------------------------------------------------------- worker thread
    def _call(self, fn: Callable[[], Any], kind: str) -> Any:
        fut: Future = Future()
        with self._lock:
            self._commands.append((fn, fut, kind))
            self._lock.notify_all()
        return fut.result()

    def _trial(self, key: str) -> _Attachment:
        t = self.trials.get(key)
        if t is None:
            raise RuntimeError(f"attachment {key} has no slot on host {self.name}")
        return t

    def _attach(self, trial_id: str, config: dict, lease: Any, key: str) -> dict:
        import torch

        from ..padded_stacks import family_key
        from ..slot_group import stack_key
        from ..slot_random import global_state
        from ..step_config import RecordingConfig
        from ..trial_settings import _is_fixed as _is_fixed_optimizer

        if key in self.trials:
            self._detach(key, "it attached again")
        try:
            reads: set = {(self.spec.seed_key,)}
            seen = RecordingConfig(config, reads)  # what the factories read: see _warn_unread
            splits: set = set()  # ... and which of it decides the stack (the model, batch size, optimizer)
            by_stack = RecordingConfig(config, splits)
            seed = trial_seed(trial_id, config, self.spec.seed_key)
            _seed_model_init(seed, self.device)
            model = _from_config(self.spec.model, "model", by_stack)
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"model(config) returned {'None' if model is None else type(model).__name__}, "
                                "not a torch.nn.Module. Fix: make the model factory return the module it builds "
                                "(e.g. model=lambda c: Net(c['width']), without a bare `return`).")
            skey = stack_key(model)
            random_state = global_state(self.device)  # where the model alone would draw its dropout from
            hparams = _from_config(self.spec.hparams, "hparams", seen)
            opt = self.spec.optimizer
            for setting in (*(opt.values() if isinstance(opt, dict) else [opt]), self.spec.batch_size):
                if callable(setting) and not _is_fixed_optimizer(setting):
                    _from_config(setting, "optimizer/batch_size", by_stack)  # records what they read
            reads |= splits
            self._stack_keys |= splits
            family = family_key(model)  # models of other widths that may share a padded stack
            group = self._stack_for(model, skey, family, config)
            if group is None:
                self._warn_split_by_setting(model)
                group = self._new_stack(model, skey, family, config)
                self._forward_paths[group.key] = group.forward_path()
                logger.info("host %s: new stack %s for trial %s, forward: %s", self.name, group.key, trial_id,
                            self._forward_paths[group.key])
                if self.move_slots:
                    self._gather_into(group)
            with self._lock:  # stats() never sees a slot owned but not yet in the step mask
                slot = group.add(trial_id, model, seed, hparams, config=config, random_state=random_state)
            self._padded_attaches += bool(group.mb.own_sizes[slot])
            self._warn_unread(config, reads | group.reads)
            self._warn_sparse_stacks()
        except BaseException:
            with self._lock:
                self.reserved.pop(key, None)
            raise
        with self._lock:  # one step: the slot never looks free between reservation and attachment
            self.reserved.pop(key, None)
            self.trials[key] = _Attachment(trial_id, group, slot, lease, config=config)
            if self._stats.first_attach is None:
                self._stats.first_attach, self._stats.first_attach_at = time.monotonic(), time.time()
            self._events.append({"t": time.time(), "event": "attach", "trial": trial_id, "slot": slot,
                                 "stack": group.key})
        return {"host": self.name, "stack": group.key, "slot": slot, "device": str(self.device),
                "node_id": self.node_id}

    def _stack_for(self, model: Any, skey: str, family: str, config: dict) -> Any:
        """The stack a trial's model joins: one of its exact shapes, or one it fits padded at a small cost
        (``padded_stacks.worth_it``). Of several, the newest: the one whose shapes cover the most
        of the sweep's widths, so that the trials of one model family gather in one stack."""
        chosen = None
        for g in self.groups.values():
            if g.model_key != skey and g.family != family or not g.accepts(config):
                continue
            if g.model_key == skey:
                chosen = g
                continue
            if g.pads_cheaply(g.fit(model, config)):
                chosen = g
        return chosen

    def _gather_into(self, new: Any) -> None:
        """Move the trials of older stacks that the new stack ``new`` now takes into it, each at its next
        result boundary (see :mod:`.balance`: a move to this same host).

        Trials come in any order: the first of a model family makes a stack of its own widths, and a wider
        one that comes later a padded stack of the widest shapes, which the narrower trials after it join
        (:meth:`_stack_for`). Those that came before stay where they are, each in a stack of its own: in
        Tune's CIFAR tutorial sweep, ported (20 trials, ``l1`` and ``l2`` searched), one host held 5 stacks
        for 8 trials. Where the new stack takes them at the same cost as a trial that comes now, they move.
        """
        import torch

        from ..slot_group import stack_key

        with self._lock:
            candidates = [t for t in self.trials.values()
                          if t.group is not new and t.group.family == new.family and t.moving_to is None
                          and t.error is None and t.config is not None and new.accepts(t.config)]
        for t in candidates:
            try:
                with torch.random.fork_rng(devices=[]):  # a probe: the trials' own draws stay where they were
                    model = _from_config(self.spec.model, "model", t.config)
                if self._stack_for(model, stack_key(model), new.family, t.config) is not new:
                    continue
            except Exception:  # noqa: BLE001 - it trained in its own stack so far: it stays there
                continue
            with self._lock:
                t.moving_to = self.name
                self._events.append({"t": time.time(), "event": "releasing", "trial": t.trial_id, "slot": t.slot,
                                     "stack": t.group.key, "to": new.key})

    def _new_stack(self, model: Any, skey: str, family: str, config: dict) -> Any:
        """A new stack for a model no stack takes: at the largest size of each of its dimensions among the
        stacks of its family and the model itself, where the model pads exactly and cheaply there
        (:mod:`ray_modelbatch.padded_stacks`); at the model's own shapes otherwise."""
        from .. import padded_stacks
        from ..padded_stacks import pad_model, widest
        from ..signature import module_signature
        from ..slot_group import SlotGroup

        def build(first: Any, key: str) -> Any:
            name = key if key not in self.groups else f"{key}.{len(self.groups)}"
            return name, SlotGroup(self.spec, name, first, self.data, self.capacity, self.device,
                                   run_ahead=self.run_ahead, config=config)

        own = module_signature(model)
        shapes = {s.name: s.shape for s in own}
        if family not in self._unpadded:
            for g in self.groups.values():  # only stacks this trial could share (batch size, optimizer, stack_by)
                if g.family == family and g.accepts(config):
                    shapes = widest(shapes, g.mb.signature)
        name = group = None
        if shapes != {s.name: s.shape for s in own}:
            try:
                name, group = build(pad_model(model, shapes), f"{skey}+pad")
                verdict = group.fit(model, config)
            except Exception as exc:  # noqa: BLE001 - a model its padded copy cannot build trains unpadded
                verdict = padded_stacks.Verdict(False, reason=f"{type(exc).__name__}: {exc}")
            if group is None or not group.pads_cheaply(verdict):
                if verdict is None or not verdict.ok:
                    self._unpadded.add(family)
                    logger.info("host %s: trials of %s do not share padded stacks (%s)", self.name,
                                type(model).__name__, "no padding possible" if verdict is None else verdict.reason)
                name = group = None
        if group is None:
            name, group = build(model, skey)
        self.groups[name] = group
        return group

    SPARSE_STACKS = 4  # stacks held, at fewer than two trials each on average, that make a sweep fuse little

    def _warn_sparse_stacks(self) -> None:
        """Warn once when the trials are spread over many stacks of one or two: fusion then gains little.

        A search space whose widths, batch sizes or optimizers take many values
        (Tune's CIFAR tutorial searches ``l1``, ``l2`` and ``batch_size`` over 4,
        4 and 3 values) gives nearly every trial a stack of its own: measured, 20
        such trials took 18 stacks, and the sweep took longer than plain Tune's.
        The warning names the config keys that decide a trial's stack. While
        trials move into a newer (padded) stack of their family on this host
        (:meth:`_gather_into`), the stacks they leave are not counted: the
        check runs again as they attach there.
        """
        if "sparse" in self._warned_keys:
            return
        if any(t.moving_to == self.name for t in self.trials.values()):
            return  # trials on their way into a newer stack of their family: judge once they are in it
        held = [g for g in self.groups.values() if g.used]
        trials = sum(g.used for g in held)
        if len(held) < self.SPARSE_STACKS or trials >= 2 * len(held):
            return
        self._warned_keys.add("sparse")
        keys = sorted(".".join(map(str, k)) for k in self._stack_keys)
        logger.warning(
            "host %s: %d trials are in %d stacks, since the model, batch size or optimizer change with config "
            "keys %s; a stack fuses only trials that share them, so this sweep gains little from fusion. Fix: "
            "search fewer values of these keys (e.g. two widths, one batch size), or sweep each value apart.",
            self.name, trials, len(held), keys)

    def _warn_split_by_setting(self, model: Any) -> None:
        """Warn once per setting when a model gets a stack of its own only because a non-tensor setting
        differs from an existing stack's model of the same shapes: a config dict kept whole on the model
        (``self.config = config``) splits every trial that differs in any value of it, even ones its
        forward never reads, and the sweep then fuses nothing."""
        from ..signature import first_setting_difference, is_plain_setting, module_settings, module_signature

        shapes = module_signature(model)
        for g in self.groups.values():
            if g.mb.module_class is not type(model) or g.mb.signature != shapes:
                continue
            found = first_setting_difference(g.mb.settings, module_settings(model))
            if found is None:
                continue
            path, name, reference, problem = found
            if is_plain_setting(reference) or ("split", path, name) in self._warned_keys:
                continue  # a plain setting (a dropout rate) splits stacks as the user's sweep means it to
            self._warned_keys.add(("split", path, name))
            logger.warning(
                "trials of %s get stacks of their own because %s: a stack runs one forward for all its "
                "trials. If forward does not read that value, keep it off the model (e.g. store only what "
                "forward uses, self.p = config['p'], not the whole config), so that such trials share a stack.",
                type(model).__name__, problem)
            return

    def _warn_unread(self, config: dict, reads: set) -> None:
        """Warn once per key about config keys named like a training setting that nothing reads.

        A port that leaves ``batch_size`` or ``lr`` in its search space without
        wiring it into ``batch_size=``/``hparams=`` would otherwise search over
        a value that changes nothing.
        """
        from ..trial_settings import unread_settings

        for key in unread_settings(config, reads):
            if key in self._warned_keys:
                continue
            self._warned_keys.add(key)
            logger.warning(
                "config key %r is never read by model(), hparams(), optimizer=, batch_size= or the train/eval "
                "steps, so it changes nothing in training. Fix: read it where it belongs, e.g. "
                "batched_trainable(batch_size=lambda c: c['batch_size']), hparams=lambda c: {'lr': c['lr']}, or "
                "model=lambda c: MyNet(c[%r]).",
                key, key,
            )

    def _detach(self, key: str, why: str) -> None:
        with self._lock:
            t = self.trials.pop(key, None)
            idle = not self.trials
            if t is not None:  # masked and unowned in one step, as stats() sees it
                t.group.remove(t.slot)
                t.group.release_if_empty()  # its last trial gone: the stack's rows go back (see there)
        if t is None:
            return
        if idle:  # the sweep's last trial (for now): its figures, however short the sweep
            self._log_stats()
        with self._lock:
            self._events.append(
                {"t": time.time(), "event": "detach", "trial": t.trial_id, "slot": t.slot, "stack": t.group.key,
                 "why": why}
            )
            waiter, t.waiter = t.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(RuntimeError(f"trial {t.trial_id} lost its slot: {why}"))

    RESERVATION_TTL_S = 120.0  # a proxy that died between reserve and attach has no lease yet

    def _check_leases(self) -> None:
        with self._lock:
            now = time.monotonic()
            for key in [k for k, t in self.reserved.items() if now - t > self.RESERVATION_TTL_S]:
                logger.warning("host %s: reservation %s was never attached; freeing it", self.name, key)
                del self.reserved[key]
        with self._lock:
            leased = [(k, t) for k, t in self.trials.items() if t.lease is not None]
        for _, t in leased:
            if t.probe is None:
                t.probe = t.lease.__ray_ready__.remote()
        if not leased:
            return
        # A probe answered either fine (alive: probe again next time) or with an actor error (dead).
        # Never ray.get a lease *object*: a borrower caches its value, so a dead owner looks alive.
        ready, _ = ray.wait([t.probe for _, t in leased], num_returns=len(leased), timeout=0)
        ready = set(ready)
        for key, t in leased:
            if t.probe not in ready:
                continue
            probe, t.probe = t.probe, None
            try:
                ray.get(probe)
            except ray.exceptions.RayActorError:
                logger.warning("host %s: trial %s's process died without cleanup; freeing its slot",
                               self.name, t.trial_id)
                self._detach(key, "its process died")
                with self._lock:
                    self._stats.freed_by_lease += 1
            except Exception:  # noqa: BLE001 - unknown: look again next time
                pass

    def _runnable(self) -> dict[Any, list[_Attachment]]:
        """Per stack, the attachments whose slots may step now (under the lock)."""
        work: dict[Any, list[_Attachment]] = {}
        for t in self.trials.values():
            if t.runnable(self.run_ahead):
                work.setdefault(t.group, []).append(t)
        return work

    def _loop(self) -> None:
        self._engine_tid = threading.get_native_id()
        last_check = last_stats = time.monotonic()
        while True:
            with self._lock:
                start_wait = time.monotonic()
                while (not self._stop and not self._commands and self._want_threads is None and not self._runnable()
                       and not self._movable()):
                    self._lock.wait(timeout=self._lease_check_s)
                    if time.monotonic() - last_check >= self._lease_check_s:
                        break
                self._stats.wait_s += time.monotonic() - start_wait
                self._stats.window_wait += time.monotonic() - start_wait
                if self._stop:
                    return
                commands = list(self._commands)
                self._commands.clear()
            t0 = time.monotonic()
            for fn, fut, kind in commands:  # served between fused steps, never behind a barrier
                c0, w0 = time.thread_time(), time.monotonic()
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - the caller's trial gets the error
                    fut.set_exception(exc)
                with self._lock:
                    cost = self._stats.commands[kind]
                    cost[0] += 1
                    cost[1] += time.monotonic() - w0
                    cost[2] += time.thread_time() - c0
            with self._lock:
                movable = self._movable()
            for key, t in movable:  # between fused steps, like the commands
                self._move_out(key, t)
            now = time.monotonic()
            if now - last_check >= self._lease_check_s:
                self._check_leases()
                last_check = now
            t1 = time.monotonic()
            with self._lock:
                work = self._runnable()
                threads, self._want_threads = self._want_threads, None
            if threads is not None:  # torch's thread count is the calling thread's: set it here
                import torch

                torch.set_num_threads(threads)
                self.threads = threads
            for group, items in work.items():
                self._step_group(group, items)
            t2 = time.monotonic()
            if now - last_stats >= self._stats_every_s:
                self._log_stats()
                last_stats = now
            with self._lock:
                self._stats.command_s += now - t0
                self._stats.housekeeping_s += (t1 - now) + (time.monotonic() - t2)

    def _step_group(self, group: Any, items: list[_Attachment]) -> None:
        """One fused step of ``group`` over ``items``' slots; results of finished iterations go out."""
        t0, c0, p0 = time.monotonic(), time.thread_time(), _preemptions()
        moved = group.compact_if_sparse()  # a sparse stack that steps whole drops its free rows
        if moved:
            with self._lock:
                for t in self.trials.values():
                    if t.group is group:
                        t.slot = moved[t.slot]
                self._events.append({"t": time.time(), "event": "compact", "stack": group.key,
                                     "capacity": group.capacity, "moved": moved})
        by_slot = {t.slot: t for t in items}
        try:
            done = group.step(list(by_slot))
            results = group.finish(done)
        except BaseException as exc:  # noqa: BLE001 - fail these trials, keep the host alive
            for t in items:
                self._fail(t, exc)
            return
        for slot, result in results.items():
            t = by_slot[slot]
            t.nonfinite_total += result["nonfinite_steps"]
            result.update({"nonfinite_steps_total": t.nonfinite_total, "slot": slot, "stack": group.key,
                           "host": self.name, "host_node": self.node_id})
            self._deliver(t, result)
        dt, cpu = time.monotonic() - t0, time.thread_time() - c0
        with self._lock:
            self.step_cost.add(cpu)
            s = self._stats
            s.busy_s += dt
            s.busy_cpu_s += cpu
            s.busy_preempted += _preemptions() - p0
            s.window_busy += dt
            s.fused_steps += 1
            s.window_steps += 1
            s.slot_steps += len(items)
            s.held_slot_steps += group.used
            s.window_stepped += len(items)
            s.window_held += group.used
            if results and s.first_result_s is None and s.first_attach is not None:
                s.first_result_s, s.first_result_at = time.monotonic() - s.first_attach, time.time()

    def _deliver(self, t: _Attachment, result: dict) -> None:
        with self._lock:
            if t.waiter is not None and not t.results:
                waiter, t.waiter = t.waiter, None
                waiter.set_result(self._take(t, result))
            else:
                t.results.append(result)

    def _fail(self, t: _Attachment, exc: BaseException) -> None:
        with self._lock:
            t.error = exc
            waiter, t.waiter = t.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # --------------------------------------------------------- host metrics
    def _use_log_dir(self, log_dir: str) -> None:
        """Log the host's figures under this experiment from now on: a later ``Tuner.fit()`` of the same
        trainable (another ``name=``) gets them under its own directory, not the first one's."""
        if log_dir == self._log_dir:  # several trials of the new experiment asked at once
            return
        if self._writer is not None:
            self._log_stats()  # the last window belongs to the previous experiment
            self._writer.close()
            self._writer = None
        self._log_dir = log_dir

    def _log_stats(self) -> None:
        """Host figures for TensorBoard: active slots, fused steps/s, time waiting for requests, memory."""
        if not self._log_dir:
            return
        import torch

        with self._lock:
            s = self._stats
            window = time.monotonic() - s.window_start
            if window <= 0:
                return
            figures = {
                "host/attached_slots": len(self.trials),
                "host/waiting_trials": sum(1 for t in self.trials.values() if t.waiter is not None),
                "host/buffered_results": sum(len(t.results) for t in self.trials.values()),
                "host/fused_steps_per_s": s.window_steps / window,
                "host/stepped_fraction": s.window_stepped / s.window_held if s.window_held else 0.0,
                "host/busy_fraction": s.window_busy / window,
                "host/wait_fraction": s.window_wait / window,
            }
            s.window_start, s.window_busy, s.window_wait = time.monotonic(), 0.0, 0.0
            s.window_steps = s.window_stepped = s.window_held = 0
        if self.device.type == "cuda":
            figures["host/device_memory_mb"] = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            figures["host/rss_mb"] = _rss_mb()
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(self._log_dir, "slot_hosts", self.name.replace(":", "_")))
        step = int(time.monotonic() - self._stats.started)
        for k, v in figures.items():
            self._writer.add_scalar(k, v, step)
        self._writer.flush()


def _rnn_kernels() -> dict[str, str]:
    from ..per_slot_rnn import choices

    return choices()


def _seed_model_init(seed: int, device: Any) -> None:
    """Seed the generator a trial's model is initialized from, as ``torch.manual_seed(seed)`` would.

    On a CPU host that is the CPU generator alone: ``torch.manual_seed`` also
    queues the seeding of CUDA (and other devices') generators, recording a
    Python stack trace each time, 1.5 ms per trial under the host's deep Ray
    stack (0.1 s of a 64-trial sweep's host time, on the engine thread). The
    CPU generator ends in the same state either way.
    """
    import torch

    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def _load_data(spec: Any, device: Any, sweep_inputs: Callable, loaded: Any = None) -> Any:
    """``spec.data()`` (or what the driver ``loaded`` with it), checked, on the host's device; with
    ``host_memory`` the training tensors stay in host memory (streamed to the device one step's batches
    at a time) and only validation moves."""
    if loaded is None:
        try:
            raw = spec.data()
        except Exception as exc:  # noqa: BLE001 - the sweep's one line must say where, as a traceback would
            raise SweepSetupError(f"data() raised {type(exc).__name__}: {exc} ({_where(exc)}). Fix data(); every "
                                  "trial of the sweep needs it.") from exc
    else:
        raw = loaded
    if not getattr(spec, "host_memory", False):
        return sweep_inputs(raw, device)
    from ..inputs import apply  # tensors, or dicts of columns (keyword inputs)

    data = sweep_inputs(raw, "cpu")
    move = lambda t: t.to(device)  # noqa: E731
    if isinstance(data, tuple) and len(data) == 4 and not hasattr(data, "_fields"):
        x, y, x_val, y_val = data
        return x, y, apply(move, x_val), apply(move, y_val)
    return data._replace(x_val=apply(move, data.x_val), y_val=apply(move, data.y_val))


def _where(exc: BaseException) -> str:
    """Where ``exc`` was raised, as ``file:line in function: `source``` of the innermost frame of the user's
    own code (not a library's: a KeyError raised inside pandas is the user's lookup), else the innermost."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "no traceback"
    libraries = ("site-packages", "dist-packages", os.path.dirname(os.__file__))
    own = [f for f in frames if not any(part in f.filename for part in libraries)]
    f = (own or frames)[-1]
    return f"{f.filename}:{f.lineno} in {f.name}" + (f": `{f.line}`" if f.line else "")


def _from_config(factory: Callable[[dict], Any], what: str, config: dict) -> Any:
    """``factory(config)``, with a missing config key named as such (not a bare ``KeyError: 'lr'``)."""
    from ..errors import TrialConfigError

    try:
        return factory(config)
    except KeyError as exc:
        if isinstance(exc, TrialConfigError):
            raise
        key = exc.args[0] if exc.args else "?"
        raise TrialConfigError(
            f"the trial config has no key {key!r}, which the {what}() factory reads (top-level keys: "
            f"{sorted(config)}). Add {key!r} to the param_space (for every trial of a conditional "
            f"space), or read it with config.get({key!r}, default)."
        ) from exc


def _pick_device(requested: str | None) -> Any:
    """The spec's device, else the GPU Ray gave this actor, else the CPU.

    A node may declare GPUs that torch cannot use (a test cluster, a driver
    mismatch); the host then trains on its CPU and says so, instead of failing.
    """
    import torch

    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SweepSetupError(f"device={requested!r}, but torch sees no CUDA device on this slot host's node "
                                  f"(torch {torch.__version__}, built for CUDA: {torch.version.cuda or 'no'}). Fix: "
                                  "leave device unset (a host on a GPU node takes its GPU), or install a CUDA build "
                                  "of torch there.")
        return device
    if ray.get_gpu_ids():
        if torch.cuda.is_available():
            return torch.device("cuda")
        logger.warning("Ray gave this host GPU %s but torch sees no CUDA device; training on the CPU",
                       ray.get_gpu_ids())
    return torch.device("cpu")


def _passive_openmp() -> None:
    """Let the host's torch threads sleep between parallel regions instead of spinning (``OMP_WAIT_POLICY``).

    A host shares its node's cores with Tune's driver and the trials' proxy
    processes. torch's OpenMP threads by default spin at the end of every
    parallel region, and a region cannot end until each of its threads has
    run: when another process holds one of the cores, every small op of a
    fused step can wait a scheduler time slice. Measured on 2 cores (a fused
    step of 8 slots of the digits CNN, 16 channels, 2 threads, with one busy
    process beside it): median 32.7 ms and single steps up to 196 ms with the
    default policy, 28.0 ms (at most 30.6) with PASSIVE, 27.3 ms with one
    thread; alone on the node PASSIVE costs 5% (17.3 against 16.5 ms).
    ``benchmarks/openmp_wait.py`` measures the host's own work (both stacks of
    the CNN sweep, stepped and finished): 21.3 ms per fused step with PASSIVE
    against 35.5 ms with the default beside one busy process, 14.8 against
    13.8 ms on an idle node; in the CNN sweep itself the host computed for 32 s
    with PASSIVE and 53 s with ACTIVE. OpenMP reads the setting when torch is
    first imported, so it is set here, first in the host's process; a user's
    own ``OMP_WAIT_POLICY`` is kept.
    """
    import sys

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _use_cpus(device: Any, threads: int | None, node_id: str, share: int = 1) -> int:
    """Give a CPU host's torch the cores nothing else on its node needs, not the 1 thread Ray's reservation implies.

    Ray sets ``OMP_NUM_THREADS`` to an actor's ``num_cpus``. The host's trials
    reserve 0.01 CPU each and wait while it computes, so by default it takes
    every CPU of its node but one (:func:`default_threads`), or its share of
    them where ``share`` hosts run on the node (``cpu_hosts_per_node``). On a
    GPU host nothing changes.
    """
    import torch

    if device.type != "cpu":
        return torch.get_num_threads()
    if threads is None:
        threads = default_threads(int(node_cpus(node_id) or os.cpu_count() or 1), share)
    threads = _machine_threads(threads)
    torch.set_num_threads(threads)
    return threads


def _machine_threads(threads: int) -> int:
    """``threads``, at least one and at most this machine's CPUs (a node may declare more than it has)."""
    return max(1, min(int(threads), os.cpu_count() or int(threads)))


def node_cpus(node_id: str) -> float | None:
    """The CPUs Ray counts on node ``node_id`` (None if it is not alive)."""
    return next((n.get("Resources", {}).get("CPU") for n in ray.nodes() if n.get("NodeID") == node_id), None)


def default_threads(cpus: int, share: int = 1) -> int:
    """Torch threads of a CPU host on a node of ``cpus`` CPUs: all but one, at least one; with ``share``
    hosts on the node (``cpu_hosts_per_node``), each takes ``cpus // share`` (at least one).

    The core left over runs what a sweep needs beside the fused steps: Tune's
    driver (about half a core in the 64-trial digits sweep), the trial server,
    Ray's raylet. A parallel region of the host ends only when each of its
    threads has run, so a thread that shares a core with them holds up every
    op of every fused step; with ``OMP_WAIT_POLICY=PASSIVE`` (which the host
    sets, see :func:`_passive_openmp`) each region also wakes its sleeping
    threads first. Measured on a 2-core node (``benchmarks/openmp_wait.py``,
    the sweep's two stacks of 8 slots, ms per fused step, median of 3 fresh
    processes): MLP 1.6 with one thread against 4.7 with two PASSIVE threads on
    an idle node, 1.5 against 1.6 beside one busy process; CNN 12.1 against
    14.3 idle, 11.9 against 14.6 beside a busy process. Two spinning threads
    (libgomp's default) win on an idle node (CNN 8.3) and lose 2.5-3.5x beside
    one busy process, which a sweep's node always has. ``host_threads=`` sets
    the count.

    Several hosts on one node (``cpu_hosts_per_node``) use its cores without
    those barriers: each process steps its own stacks with its own threads, and
    one that waits for a core holds up no other. Measured on the 2-core node,
    the CNN sweep (``benchmarks/tune_sweep.py --arch cnn --cpu-hosts-per-node
    2``): two one-thread hosts 20.8-28.7 s (median 26.1), one host 25.8-36.2 s
    (median 33.2), six runs each, alternating; in process, two half stacks of the CNN
    stepped side by side by two threads took 16-19 ms against 24-26 ms for the
    whole stack on one thread. A tiny MLP's step is mostly Python and dispatch,
    which a second host only duplicates: the MLP sweep took 9.8-10.2 s with
    two hosts against 8.3 s with one.
    """
    if share > 1:
        return max(1, int(cpus) // int(share))
    return max(1, int(cpus) - 1)


def _preemptions() -> int:
    """Involuntary context switches of the calling thread so far (Linux), else 0: on a small node, how often
    other processes took the engine thread's core."""
    who = getattr(resource, "RUSAGE_THREAD", None) if resource is not None else None
    return 0 if who is None else resource.getrusage(who).ru_nivcsw


def _cpu_wait_s(tid: int | None) -> float:
    """Seconds thread ``tid`` of this process has been runnable but waiting for a core (Linux's schedstat; 0
    elsewhere, or before the thread runs).

    On a small node, this is the engine thread's time lost to the other
    processes (Tune's controller, Ray's daemons). Read when asked, not per
    fused step: opening a ``/proc`` file costs about 0.1 ms here.
    """
    if tid is None:
        return 0.0
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")
