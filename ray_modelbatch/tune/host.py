"""The slot host: one Ray actor per GPU (or node) that trains many Tune trials as fused stacks.

Continuous batching, no barrier: each proxy ``step()`` is a request for K more
fused steps. A single worker thread loops: it first serves control commands
(attach, detach, save, restore) so that PBT's blocking save in the driver is
answered between two fused steps, then runs one fused step per stack over the
slots that still have steps outstanding. A slot whose K steps are done is
evaluated and answered at once; the others keep going. A slot with no request
does not advance.

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

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    remaining: int
    future: Future
    loss_sum: float = 0.0
    grad_sum: float = 0.0
    finite_steps: int = 0
    nonfinite_steps: int = 0


@dataclass
class _Trial:
    trial_id: str
    stack: Any
    slot: int
    lease: Any  # the proxy's actor handle, or None (never freed by the lease check)
    probe: Any = None  # the lease's in-flight liveness probe
    request: _Request | None = None
    reports: int = 0
    nonfinite_steps: int = 0


@dataclass
class _Stats:
    started: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0
    wait_s: float = 0.0
    fused_steps: int = 0
    slot_steps: int = 0
    window_start: float = field(default_factory=time.monotonic)
    window_busy: float = 0.0
    window_wait: float = 0.0
    window_steps: int = 0
    max_held: int = 0  # high-water mark of attached + reserved trials
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
                 stats_every_s: float = 5.0, profile_config: dict | None = None, max_slots: int = 256):
        import cloudpickle
        import torch

        self.spec = cloudpickle.loads(spec_bytes)
        self.name = name
        self.device = _pick_device(self.spec.device)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.in_placement_group = ray.util.get_current_placement_group() is not None
        x, y, xv, yv = self.spec.data()
        self.data = tuple(torch.as_tensor(t).to(self.device) for t in (x, y, xv, yv))
        self.capacity_fit: str | None = None
        if capacity == "auto":
            fit = self._profile(profile_config or {}, max_slots)
            self.capacity, self.capacity_fit = fit.slots, fit.describe()
            logger.info("host %s: %s", name, self.capacity_fit)
        else:
            self.capacity = int(capacity)
        self.stacks: dict[str, Any] = {}
        self.trials: dict[str, _Trial] = {}
        self.reserved: dict[str, float] = {}  # key -> when reserved; see _check_leases
        self._lock = threading.Condition()
        self._commands: collections.deque = collections.deque()
        self._stop = False
        self._lease_check_s = lease_check_s
        self._stats_every_s = stats_every_s
        self._stats = _Stats()
        self._events: collections.deque = collections.deque(maxlen=256)  # recent attach/detach, for stats()
        self._writer = None
        self._log_dir: str | None = None
        self._thread = threading.Thread(target=self._loop, name=f"{name}-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ public API
    def _profile(self, config: dict, max_slots: int) -> Any:
        """Slots of ``config``'s model that fit this host's device (see :mod:`ray_modelbatch.capacity`)."""
        import torch

        from ..capacity import profile_capacity
        from .stack import Stack

        def model() -> Any:
            torch.manual_seed(0)
            return _from_config(self.spec.model, "model", config)

        hparams = _from_config(self.spec.hparams, "hparams", config)
        build = Stack.build_for_profile(self.spec, model, self.data, self.device, hparams)
        return profile_capacity(build, self.device, max_slots=max_slots)

    def ping(self) -> dict:
        """Who and where this host is; the registry waits for it before handing out slots."""
        return {"name": self.name, "capacity": self.capacity, "capacity_fit": self.capacity_fit,
                "device": str(self.device), "node_id": self.node_id,
                "pid": os.getpid(), "in_placement_group": self.in_placement_group}

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
        if log_dir and self._log_dir is None:
            self._log_dir = log_dir
        return self._call(lambda: self._attach(trial_id, config, lease_box[0], key or trial_id))

    def train(self, key: str, steps: int) -> dict:
        """Run ``steps`` more fused steps for the attachment, then evaluate it; returns its metrics."""
        fut: Future = Future()
        with self._lock:
            trial = self.trials.get(key)
            if trial is None:
                raise RuntimeError(f"attachment {key} has no slot on host {self.name}; the trial must attach first")
            if trial.request is not None:
                raise RuntimeError(f"trial {trial.trial_id} already has a step in flight on host {self.name}")
            trial.request = _Request(int(steps), fut)
            self._lock.notify_all()
        return fut.result()

    def save(self, key: str) -> bytes:
        return self._call(lambda: self._trial(key).stack.export(self._trial(key).slot))

    def restore(self, key: str, blob: bytes, config: dict) -> None:
        def run():
            t = self._trial(key)
            t.stack.load(t.slot, blob, self.spec.hparams(config))

        return self._call(run)

    def detach(self, key: str) -> None:
        """Free the attachment's slot at once (it is masked out of the next fused step)."""

        def run() -> None:
            with self._lock:
                self.reserved.pop(key, None)
            self._detach(key, "the trial ended")

        return self._call(run)

    def stats(self) -> dict:
        with self._lock:
            s = self._stats
            wall = time.monotonic() - s.started
            return {
                "host": self.name,
                "device": str(self.device),
                "node_id": self.node_id,
                "pid": os.getpid(),
                "in_placement_group": self.in_placement_group,
                "capacity": self.capacity,
                "capacity_fit": self.capacity_fit,
                "attached": len(self.trials),
                "reserved": len(self.reserved),
                "stacks": {
                    k: {"capacity": st.capacity, "used": st.used, "active": int(st.mb.active_slots.numel())}
                    for k, st in self.stacks.items()
                },
                "trials": {t.trial_id: t.slot for t in self.trials.values()},
                "events": list(self._events),
                "fused_steps": s.fused_steps,
                "slot_steps": s.slot_steps,
                "busy_s": s.busy_s,
                "wait_s": s.wait_s,
                "wall_s": wall,
                "busy_fraction": s.busy_s / wall if wall > 0 else 0.0,
                "max_held": s.max_held,
                "refused": s.refused,
                "freed_by_lease": s.freed_by_lease,
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
    def _call(self, fn: Callable[[], Any]) -> Any:
        fut: Future = Future()
        with self._lock:
            self._commands.append((fn, fut))
            self._lock.notify_all()
        return fut.result()

    def _trial(self, key: str) -> _Trial:
        t = self.trials.get(key)
        if t is None:
            raise RuntimeError(f"attachment {key} has no slot on host {self.name}")
        return t

    def _attach(self, trial_id: str, config: dict, lease: Any, key: str) -> dict:
        import torch

        from .stack import Stack, stack_key

        if key in self.trials:
            self._detach(key, "it attached again")
        try:
            with torch.device("meta"):
                skey = stack_key(_from_config(self.spec.model, "model", config))
            seed = trial_seed(trial_id, config, self.spec.seed_key)
            torch.manual_seed(seed)
            model = _from_config(self.spec.model, "model", config)
            hparams = _from_config(self.spec.hparams, "hparams", config)
            stack = self.stacks.get(skey)
            if stack is None:
                stack = Stack(self.spec, skey, model, self.data, self.capacity, self.device)
                self.stacks[skey] = stack
                logger.info("host %s: new stack %s for trial %s", self.name, skey, trial_id)
            slot = stack.add(trial_id, model, seed, hparams)
        except BaseException:
            with self._lock:
                self.reserved.pop(key, None)
            raise
        with self._lock:  # one step: the slot never looks free between reservation and attachment
            self.reserved.pop(key, None)
            self.trials[key] = _Trial(trial_id, stack, slot, lease)
            self._events.append({"t": time.time(), "event": "attach", "trial": trial_id, "slot": slot, "stack": skey})
        return {"host": self.name, "stack": skey, "slot": slot, "device": str(self.device), "node_id": self.node_id}

    def _detach(self, key: str, why: str) -> None:
        with self._lock:
            t = self.trials.pop(key, None)
        if t is None:
            return
        t.stack.remove(t.slot)
        with self._lock:
            self._events.append(
                {"t": time.time(), "event": "detach", "trial": t.trial_id, "slot": t.slot, "stack": t.stack.key, "why": why}
            )
        if t.request is not None and not t.request.future.done():
            t.request.future.set_exception(RuntimeError(f"trial {t.trial_id} lost its slot: {why}"))

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

    def _pending(self) -> dict[Any, list[tuple[str, _Trial]]]:
        work: dict[Any, list[tuple[str, _Trial]]] = {}
        for trial_id, t in self.trials.items():
            if t.request is not None and t.request.remaining > 0:
                work.setdefault(t.stack, []).append((trial_id, t))
        return work

    def _loop(self) -> None:
        last_check = last_stats = time.monotonic()
        while True:
            with self._lock:
                start_wait = time.monotonic()
                while not self._stop and not self._commands and not self._has_work():
                    self._lock.wait(timeout=self._lease_check_s)
                    if time.monotonic() - last_check >= self._lease_check_s:
                        break
                self._stats.wait_s += time.monotonic() - start_wait
                self._stats.window_wait += time.monotonic() - start_wait
                if self._stop:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for fn, fut in commands:  # served between fused steps, never behind a barrier
                try:
                    fut.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - the caller's trial gets the error
                    fut.set_exception(exc)
            now = time.monotonic()
            if now - last_check >= self._lease_check_s:
                self._check_leases()
                last_check = now
            with self._lock:
                work = self._pending()
            for stack, items in work.items():
                self._step_stack(stack, items)
            if now - last_stats >= self._stats_every_s:
                self._log_stats()
                last_stats = now

    def _has_work(self) -> bool:
        return any(t.request is not None and t.request.remaining > 0 for t in self.trials.values())

    def _step_stack(self, stack: Any, items: list[tuple[str, _Trial]]) -> None:
        slots = [t.slot for _, t in items]
        t0 = time.monotonic()
        try:
            res = stack.train_step(slots)
            losses, bad, gnorm = res.losses.tolist(), res.nonfinite.tolist(), res.grad_norm.tolist()
        except BaseException as exc:  # noqa: BLE001 - fail these requests, keep the host alive
            for trial_id, t in items:
                self._fail(trial_id, t, exc)
            return
        done: list[tuple[str, _Trial]] = []
        for (trial_id, t), loss, nf, g in zip(items, losses, bad, gnorm):
            r = t.request
            r.remaining -= 1
            if nf:
                r.nonfinite_steps += 1
            else:
                r.loss_sum += loss
                r.grad_sum += g
                r.finite_steps += 1
            if r.remaining == 0:
                done.append((trial_id, t))
        if done:
            try:
                metrics = stack.evaluate([t.slot for _, t in done])
            except BaseException as exc:  # noqa: BLE001
                for trial_id, t in done:
                    self._fail(trial_id, t, exc)
                done = []
            lr = stack.opt.current_lr().tolist() if done else []
            for j, (trial_id, t) in enumerate(done):
                self._answer(trial_id, t, {k: v[j] for k, v in metrics.items()}, lr[t.slot])
        dt = time.monotonic() - t0
        with self._lock:
            s = self._stats
            s.busy_s += dt
            s.window_busy += dt
            s.fused_steps += 1
            s.window_steps += 1
            s.slot_steps += len(items)

    def _answer(self, trial_id: str, t: _Trial, val: dict, lr: float) -> None:
        r = t.request
        t.request = None
        t.reports += 1
        t.nonfinite_steps += r.nonfinite_steps
        nan = float("nan")
        result = {
            "train_loss": r.loss_sum / r.finite_steps if r.finite_steps else nan,
            "grad_norm": r.grad_sum / r.finite_steps if r.finite_steps else nan,
            "lr": lr,
            "nonfinite_steps": r.nonfinite_steps,
            "nonfinite_steps_total": t.nonfinite_steps,
            "slot_steps": int(t.stack.opt.steps[t.slot]),
            "slot": t.slot,
            "stack": t.stack.key,
            "host": self.name,
            "host_node": self.node_id,
        }
        result.update({f"val_{k}": v for k, v in val.items()})
        r.future.set_result(result)

    def _fail(self, trial_id: str, t: _Trial, exc: BaseException) -> None:
        r = t.request
        t.request = None
        if r is not None and not r.future.done():
            r.future.set_exception(exc)

    # --------------------------------------------------------- host metrics
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
                "host/active_slots": sum(1 for t in self.trials.values() if t.request is not None),
                "host/fused_steps_per_s": s.window_steps / window,
                "host/busy_fraction": s.window_busy / window,
                "host/wait_fraction": s.window_wait / window,
            }
            s.window_start, s.window_busy, s.window_wait, s.window_steps = time.monotonic(), 0.0, 0.0, 0
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
        return torch.device(requested)
    if ray.get_gpu_ids():
        if torch.cuda.is_available():
            return torch.device("cuda")
        logger.warning("Ray gave this host GPU %s but torch sees no CUDA device; training on the CPU",
                       ray.get_gpu_ids())
    return torch.device("cpu")


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")
