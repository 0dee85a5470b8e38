"""The driver's side of shared trials: an actor class and handles that Tune drives like real actors.

Tune's controller (Ray 2.60) makes a trial's actor with
``actor_cls.options(**resources).remote(**kwargs)``, calls its methods with
``handle.<method>.remote(...)`` (``__ray_ready__`` first, ``__ray_terminate__``
or ``stop`` last) and ends it with ``ray.kill``. :class:`SharedTrialClass` and
:class:`SharedTrialHandle` answer the same calls, but every trial's actor is an
object in one process that serves them: the sweep's slot host when it has
only one (:meth:`~ray_modelbatch.tune.host.SlotHost.trial_call`), else the
driver's one :class:`~ray_modelbatch.tune.trial_server.TrialServer`. Each call
becomes ``trial_call(key, seq, method, ...)`` there, whose future Tune waits on
as usual. Why, and the guarantees kept: see ``trial_table`` and ``trial_server``.

Tune still reserves each trial's resources (its placement group of 0.01 CPU by
default), so its scheduling and concurrency limits are unchanged; only the
process is shared. ``ray.kill`` of a shared handle is routed by
``ray_compat.run_trials_as_light_actors``.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from typing import Any

import ray
from ray.actor import ActorClass

from . import ray_compat
from .slot_client import spec_attrs

_server_lock = threading.RLock()  # reentrant: a handle's __del__ (ending its trial) may run under it
_server: list = []  # [handle, Ray session]: the driver holds the creating handle (Ray ends the actor without it)
_host: list = []  # [slot host handle, Ray session]: the sweep's only host, which serves its trials (serve_on_host)
_host_live = [0]  # trials served by that host now (made and not yet ended)
# Trials one host serves at once, at most; more go to a trial server. Each call of a host-served trial holds
# one of the host's Ray threads while it runs or waits for its turn (a trial waiting for a free slot keeps
# its __init__ and its __ray_ready__ waiting), and a threaded actor makes all its threads when it starts:
# see registry.HOST_THREADS.
HOST_TRIALS_MAX = 256


def _session() -> tuple:
    context = ray.get_runtime_context()
    return context.get_node_id(), context.get_job_id()  # a new ray.init() in this driver: a new server


def serve_on_host(host: Any) -> None:
    """Let the sweep's only slot host serve the trials this driver makes from now on (see ``trial_table``).

    Called by the driver's prestart when the sweep plans one host, on the driver's node. Until
    :func:`forget_trial_server`, new trials are objects in that host: their
    calls to their slot are plain Python calls, and no trial server starts.
    """
    with _server_lock:
        _host[:] = [host, _session()]
        _host_live[0] = 0


def trial_server() -> Any:
    """This driver's trial server, started on first use outside any placement group, again if it died."""
    return _serving(host_ok=False)[0]


def _serving(host_ok: bool = True) -> tuple[Any, bool]:
    """The process that serves a new trial of this driver, and whether it is the sweep's only slot host.

    The server is started on first use, outside any placement group, and again
    if it died. When the process that serves them dies, its trials fail as their
    own processes would have, and Tune restarts them per ``FailureConfig``: by
    then Ray knows it is dead, so the restarted trials get a trial server (the
    registry plans a new host for their slots).
    """
    from .trial_server import TrialServer

    session = _session()
    with _server_lock:
        if _host and (_host[1] != session or ray_compat.actor_is_dead(_host[0])):
            _host.clear()  # its trials failed with it; the registry starts another host for their slots
        if host_ok and _host and _host_live[0] < HOST_TRIALS_MAX:
            _host_live[0] += 1  # until the trial's handle ends (SharedTrialHandle._end)
            return _host[0], True
        if _server and _server[1] == session and not ray_compat.actor_is_dead(_server[0]):
            return _server[0], False
        handle = (
            ray.remote(TrialServer)
            .options(
                num_cpus=0,
                max_restarts=0,
                max_concurrency=100_000,  # an async actor: calls wait on asyncio, not on threads of their own
                scheduling_strategy=ray_compat.on_this_node_if_driver(),  # out of placement groups, by the driver
            )
            .remote()
        )
        _server[:] = [handle, session]
        return handle, False


def forget_trial_server() -> None:
    """Drop the driver's own handle of its trial server, and of the host that served trials (at the end of ``fit()``).

    The server's process ends when the last handle to it goes: Tune drops its
    trials' handles as it stops them, so nothing of a sweep outlives ``fit()``
    except the slot hosts' idle timeout. A later ``fit()`` starts a new server,
    or has its own host serve its trials.
    """
    with _server_lock:
        _server.clear()
        _host.clear()
        _host_live[0] = 0


class SharedTrialClass(ActorClass):
    """Stands in for a batched trainable's actor class; ``remote()`` makes a trial in the shared server.

    A subclass of Ray's ``ActorClass`` only so that Tune's actor manager takes
    it as one (it would otherwise wrap it with ``ray.remote``); made with
    :meth:`of`, never through ``ActorClass``'s constructor.
    """

    _payload: dict

    @classmethod
    def of(cls, trainable_cls: type) -> SharedTrialClass:
        self = object.__new__(cls)
        self._payload = {"name": f"{trainable_cls.__name__}-{uuid.uuid4().hex[:8]}",
                         "class_name": trainable_cls.__name__, "attrs": spec_attrs(trainable_cls)}
        self._payload_ref = None
        return self

    def options(self, **_resources: Any) -> SharedTrialClass:
        """Tune's resources for the trial: its placement group holds them; the shared process needs none."""
        return self

    def remote(self, *args: Any, **kwargs: Any) -> SharedTrialHandle:
        if self._payload_ref is None:
            self._payload_ref = ray.put(self._payload)  # the spec travels once, not with every trial
        return SharedTrialHandle(*_serving(), self._payload_ref, args, kwargs)

    def __repr__(self) -> str:
        return f"SharedTrialClass({self._payload['class_name']})"


class SharedTrialHandle:
    """One trial's actor handle: ``handle.<method>.remote(...)`` runs the method of its object where it is served."""

    def __init__(self, server: Any, on_host: bool, payload_ref: Any, args: tuple, kwargs: dict) -> None:
        self._server = server
        self._on_host = on_host  # served by the sweep's only host: counted in _host_live until it ends
        self._key = uuid.uuid4().hex
        self._seq = itertools.count()
        self._ended = False
        # Its errors surface at __ray_ready__, as Ray's do; the call itself returns None (see TrialServer._run)
        self._started = self._submit("__init__", args, kwargs, payload_ref)

    def _end(self) -> None:
        if not self._ended and self._on_host:
            with _server_lock:
                _host_live[0] = max(0, _host_live[0] - 1)
        self._ended = True

    def _submit(self, method: str, args: tuple, kwargs: dict, payload: Any = None) -> Any:
        if method in ("stop", "__ray_terminate__"):
            self._end()
        ref = self._server.trial_call.remote(self._key, next(self._seq), method, args, kwargs, payload)
        if method == "__ray_ready__":
            # Tune reads this call's outcome, a failed constructor's error included, unless it stops the trial
            # first (a sweep stopped by a SweepSetupError, whose error is printed once): then Ray would print
            # the dropped reference's error as an "Unhandled error" traceback. A future marks it read.
            ref.future()
        return ref

    def __getattr__(self, name: str) -> _SharedMethod:
        if name.startswith("_") and name not in ("__ray_ready__", "__ray_terminate__"):
            raise AttributeError(name)
        return _SharedMethod(self, name)

    def kill(self) -> None:
        """``ray.kill`` of this trial's actor: end it where it is served, now (its slot is freed at once)."""
        self._end()
        self._server.trial_kill.remote(self._key)

    def __del__(self) -> None:
        # Ray ends an actor whose last handle is dropped; a trial that Tune dropped without stop() (its
        # constructor failed) is forgotten by the server the same way.
        if not self._ended:
            try:
                self.kill()
            except Exception:  # noqa: BLE001 - Ray already shut down: the server is gone with it
                pass

    def __repr__(self) -> str:
        return f"SharedTrialHandle({self._key[:8]})"


class _SharedMethod:
    def __init__(self, handle: SharedTrialHandle, name: str) -> None:
        self._handle, self._name = handle, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._handle._submit(self._name, args, kwargs)


def is_shared_handle(handle: Any) -> bool:
    return isinstance(handle, SharedTrialHandle)
