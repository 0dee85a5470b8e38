"""The trial's side of a slot: attach to a slot host, ask it for iterations, move the slot's bytes.

Every stacked model is a real Tune trial, and each trial runs in its own
process, but the model lives on a shared slot host: this class is what that
process does. It holds no model and imports neither torch nor ``ray.tune``
(the Tune protocol around it is :class:`~ray_modelbatch.tune.trial_actor.SlotTrialActor`,
or the classic ``Trainable`` :class:`~ray_modelbatch.tune.proxy.SlotTrialProxy`).
``step()`` asks the host for the trial's next iteration and returns when it is
done; the host keeps stepping the other trials meanwhile.

The methods are named after ``Trainable``'s hooks (``setup``, ``step``,
``save_checkpoint``, ``load_checkpoint``, ``reset_config``, ``cleanup``), so
that both protocols call the same code. A subclass provides ``trial_id``,
``config``, ``_experiment_dir()`` and ``_skip_taken_checkpoints()``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import sys
import time
import uuid
from typing import Any, Iterable

import ray

from ..errors import SlotHostLostError, SlotHostStartError
from . import ray_compat
from .balance import MOVE_KEY, is_move
from .registry import get_registry

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "slot_state.pt"  # ray_modelbatch.checkpoint.STATE_FILE (not imported: it imports torch)
CONFIG_FILE = "trial_config.json"  # ray_modelbatch.checkpoint.CONFIG_FILE
CONFIG_PICKLE = "trial_config.pkl"  # ray_modelbatch.checkpoint.CONFIG_PICKLE


_LOCAL_HOSTS: dict[str, Any] = {}  # actor ID -> the slot host object of this process that serves trials


def serve_locally(actor_id: str, host: Any) -> None:
    """Register this process's slot host, which holds trials' actor objects (``SlotHost.trial_call``)."""
    _LOCAL_HOSTS[actor_id] = host


def local_host(handle: Any) -> Any:
    """The slot host object behind ``handle`` when it lives in this process (a trial it serves), else None."""
    return _LOCAL_HOSTS.get(ray_compat.actor_id_of(handle)) if _LOCAL_HOSTS else None


_REGISTRIES: dict[tuple, Any] = {}  # (experiment, Ray job) -> its registry's handle, as this process last got it


def _registry(spec_bytes: bytes, experiment: str, options: dict, fresh: bool = False) -> Any:
    """The experiment's registry, got once per process and Ray job (asking Ray again costs about 1 ms of this
    process's CPU and a request to Ray's control store); ``fresh``: the handle held failed, so ask (or create)
    anew."""
    key = (experiment, ray.get_runtime_context().get_job_id())
    if fresh or key not in _REGISTRIES:
        _REGISTRIES[key] = get_registry(spec_bytes, experiment, options)
    return _REGISTRIES[key]


def spec_attrs(trainable_cls: type) -> dict:
    """What makes a batched trainable's trials: its own ``_spec_bytes``, ``_experiment`` and ``_options``, to give
    the class that runs them (a light actor class, or a shared trial's in the trial server)."""
    return {k: vars(trainable_cls)[k] for k in ("_spec_bytes", "_experiment", "_options")}


def save_config(config: dict, directory: str) -> None:
    """The trial's config beside its checkpoint, for ``trainable.load_model``: as JSON (readable), and where JSON
    cannot hold it exactly (a class, a tuple, a numpy number) also pickled, as Tune keeps ``params.pkl``.

    A JSON stand-in (``"<class 'torch.nn.modules.activation.Tanh'>"``, a list for a tuple) would reach the user's
    model factory and fail there with an error that says nothing about the checkpoint.
    """
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(config, f, default=repr)
    pickled = os.path.join(directory, CONFIG_PICKLE)
    try:
        copy = json.loads(json.dumps(config))
        exact = copy == config and _same_types(copy, config)
    except (TypeError, ValueError):
        exact = False
    if exact:
        if os.path.exists(pickled):  # a directory written again: no older config may win over this one
            os.remove(pickled)
        return
    try:
        blob = pickle.dumps(config)
    except Exception:  # noqa: BLE001 - a lambda, a local class: by value
        try:
            blob = ray.cloudpickle.dumps(config)
        except Exception:  # noqa: BLE001 - cannot be kept: load_model names config=
            return
    with open(pickled, "wb") as f:
        f.write(blob)


def _same_types(a: Any, b: Any) -> bool:
    """Whether JSON's copy ``a`` has the types of ``b`` throughout (JSON turns a tuple into a list)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return all(_same_types(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return all(_same_types(x, y) for x, y in zip(a, b))
    return True


def with_parameters_error(keys: Iterable[str]) -> TypeError:
    """What ``tune.with_parameters(trainable, **keys)`` gets for a batched trainable, and what to write instead."""
    return TypeError(
        f"tune.with_parameters(...) passed {sorted(keys)} to the trial, but a batched trial's model trains "
        "on a shared slot host, not in the trial's process. Give large objects to the host instead: return "
        "them from batched_trainable(data=...) (called once per sweep), or close over them in model=/hparams=.")


class SlotClient:
    """One trial's hold on a slot of a slot host (see the module docstring)."""

    _spec_bytes: bytes = b""
    _experiment: str = ""
    _options: dict = {}

    trial_id: str
    config: dict

    def _experiment_dir(self) -> str | None:
        """Where the host writes this trial's TensorBoard figures."""
        raise NotImplementedError

    def _skip_taken_checkpoints(self) -> None:
        """Make this trial's next checkpoint directory one that does not exist yet (see ``ray_compat``)."""
        raise NotImplementedError

    def setup(self, config: dict, **params: Any) -> None:
        if params:
            raise with_parameters_error(params)
        quiet_sigterm()
        self._host = None
        self._local = None  # the slot host object, where it lives in this process
        self._attached: str | None = None
        self._attach(config)

    def _attach(self, config: dict, prefer: str | None = None) -> None:
        """Get a slot from the registry (on host ``prefer`` if it has room) and attach to it; waits for one."""
        if prefer is None:  # a move keeps the trial's checkpoint numbering as it is
            self._skip_taken_checkpoints()
        registry = _registry(self._spec_bytes, self._experiment, self._options)
        token = f"{self.trial_id}:{uuid.uuid4().hex[:8]}"  # this attachment; see SlotHost.attach
        waited, warned, actor_errors = time.monotonic(), False, 0
        while True:
            try:
                got = ray.get(registry.assign.remote(token, config, prefer))
                if got is not None:
                    self._host_name, self._host = got
                    # A host that serves this trial's actor object is called in place; it needs no lease: the
                    # object dies with it. Any other host frees the slot when this process dies without cleanup().
                    self._local = local_host(self._host)
                    if self._local is not None:
                        self._slot = self._local.attach(self.trial_id, config, [None], self._experiment_dir(), token)
                    else:
                        self._slot = ray.get(self._host.attach.remote(
                            self.trial_id, config, [own_handle()], self._experiment_dir(), token))
                    break
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, SlotHostStartError):  # SweepSetupError too: the driver then stops the sweep
                    raise type(cause)(str(cause)) from None  # one line, not the registry's traceback
                raise
            except ray.exceptions.RayActorError:
                # The registry stopped itself (idle timeout) just as this trial came, or the host
                # died between reservation and attachment: ask a new registry.
                actor_errors += 1
                if actor_errors > 5:
                    raise
                time.sleep(0.5)
                registry = _registry(self._spec_bytes, self._experiment, self._options, fresh=True)
                continue
            elapsed = time.monotonic() - waited
            if elapsed > self._options.get("oversubscribe_warn_s", 5.0) and (
                    not warned or elapsed > self._options.get("host_start_timeout_s", 120.0)):
                reason = ray.get(registry.waiting_reason.remote())
                if reason and warned:  # resources, not full hosts: waiting longer would wait forever
                    raise SlotHostStartError(f"trial {self.trial_id} got no slot in {elapsed:.0f}s: {reason}")
                if reason:
                    logger.warning("trial %s is waiting for a slot host: %s", self.trial_id, reason)
                    warned = True
                    continue
            if (not warned and elapsed > self._options.get("oversubscribe_warn_s", 5.0)
                    and not ray.get(registry.holding_back.remote())):  # waiting for a second host: not full
                capacity = ray.get(registry.capacity.remote())
                logger.warning(
                    "trial %s is waiting for a free slot. Either Tune started more trials than the %d slots "
                    "of this experiment: set TuneConfig(max_concurrent_trials=<trainable>.max_concurrent()) "
                    "or wrap the searcher with ray_modelbatch.tune.FreeSlotLimiter. Or no node has a GPU (or "
                    "host_cpus CPUs) free to start a slot host on: free one, or add nodes.",
                    self.trial_id, capacity,
                )
                warned = True
            time.sleep(0.2)
        self._token = token
        self._attached = self.trial_id

    def _detach(self) -> None:
        if self._host is not None and self._attached is not None:
            try:
                self._on_host("detach", self._token)
            except SlotHostLostError:
                pass  # the host is gone, and the slot with it
        self._attached = None

    def _on_host(self, method: str, *args: Any) -> Any:
        """Call the slot host (in place where it serves this trial); a dead host becomes an error Tune can
        recover the trial from."""
        if self._local is not None:
            return getattr(self._local, method)(*args)
        try:
            return ray.get(getattr(self._host, method).remote(*args))
        except ray.exceptions.RayActorError as exc:
            raise self._host_lost(method, exc) from exc

    async def _on_host_async(self, method: str, *args: Any) -> Any:
        """:meth:`_on_host` for an asyncio caller: the answer is awaited on the caller's event loop."""
        try:
            return await getattr(self._host, method).remote(*args)
        except ray.exceptions.RayActorError as exc:
            raise self._host_lost(method, exc) from exc

    def _host_lost(self, method: str, exc: BaseException) -> SlotHostLostError:
        self._attached = None
        return SlotHostLostError(
            f"slot host {self._host_name} of trial {self.trial_id} died during {method}() "
            f"({type(exc).__name__}). Tune restarts the trial from its last checkpoint on a new host as often "
            "as tune.FailureConfig(max_failures) allows (0 by default); tune.CheckpointConfig(checkpoint_frequency=N) "
            "bounds the iterations lost."
        )

    def step(self) -> dict[str, Any]:
        while True:
            answer = self._on_host("train", self._token)
            if not is_move(answer):
                return answer
            self._move(answer[MOVE_KEY])

    async def step_async(self) -> dict[str, Any]:
        """:meth:`step` for an asyncio caller (the trial server serves every trial's iterations on one loop)."""
        while True:
            answer = await self._on_host_async("train", self._token)
            if not is_move(answer):
                return answer
            await asyncio.get_running_loop().run_in_executor(None, self._move, answer[MOVE_KEY])

    def _move(self, move: dict) -> None:
        """Continue on the host the registry moved this slot to (see :mod:`.balance`): the old host freed
        the slot and sent its state at the boundary Tune knows; attach there and load it."""
        self._attached = None
        self._attach(self.config, prefer=move["to"])
        self._on_host("restore", self._token, move["blob"], self.config,
                      {"from": move["from"], "nonfinite_total": move.get("nonfinite_total", 0)})

    def save_checkpoint(self, checkpoint_dir: str) -> str:
        """The host's bytes for this slot, at the last iteration Tune took, as ``slot_state.pt``.

        With PBT the directory may outlive this trial's use of it: a recipient loads it later, and
        ``ray_compat.keep_restore_sources`` keeps Tune's retention from deleting it before then.
        """
        blob = self._on_host("save", self._token)
        with open(os.path.join(checkpoint_dir, CHECKPOINT_FILE), "wb") as f:
            f.write(blob)
        save_config(self.config, checkpoint_dir)
        return checkpoint_dir

    def load_checkpoint(self, checkpoint: Any) -> None:
        """Send the checkpoint's bytes to this trial's slot, with this trial's own (maybe new) config."""
        path = checkpoint if isinstance(checkpoint, str) else checkpoint.path
        try:
            with open(os.path.join(path, CHECKPOINT_FILE), "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"trial {self.trial_id} cannot restore: {os.path.join(path, CHECKPOINT_FILE)} does not exist "
                "(deleted, or not a checkpoint of a ray_modelbatch trainable)"
            ) from None
        self._on_host("restore", self._token, blob, self.config)

    def reset_config(self, new_config: dict) -> bool:
        """Reused actor (``reuse_actors=True``): free the old trial's slot, attach the new trial."""
        self._detach()
        self._attach(new_config)
        return True

    def cleanup(self) -> None:
        self._detach()


def quiet_sigterm() -> None:
    """End this trial process at SIGTERM without a traceback on the user's screen.

    Ray ends a trial's process with SIGTERM, and its handler raises SystemExit
    in whatever Python code runs next. When that is a finalizer (an actor
    handle's or a weak set's ``__del__``, at the end of every sweep), Python
    prints "Exception ignored in ..." and a traceback, which Ray forwards to
    the driver although the sweep succeeded. The proxy holds no state worth
    a graceful shutdown (the host owns every slot), so it flushes its output
    and exits at once. Only in a Ray worker's main thread; once per process.
    """
    if getattr(quiet_sigterm, "done", False):
        return
    try:
        if ray.get_runtime_context().get_actor_id() is None:
            return  # not a trial process (a test running the proxy in the driver)

        def exit_now(signum: int, frame: Any) -> None:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 - a closed stream: nothing left to flush
                    pass
            os._exit(1)  # Ray's own handler exits with 1 too

        signal.signal(signal.SIGTERM, exit_now)
        quiet_sigterm.done = True
    except ValueError:  # not the main thread: keep Ray's handler
        pass


def own_handle() -> Any:
    """This proxy's actor handle (its lease), or None when it does not run as a Ray actor."""
    try:
        return ray.get_runtime_context().current_actor
    except RuntimeError:
        return None
