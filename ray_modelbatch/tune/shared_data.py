"""The sweep's data, loaded once by the driver while the slot hosts start, and handed to every host.

Why: until the first slot host is ready no trial can train, and a host's start
is one core's serial work: Ray's worker, ``import torch``, then the user's
``data()`` (for the digits sweep, scikit-learn's import and the load: 1.2-2.8 s
on a 2-core node), while the node's other cores may sit idle. The driver has
already imported torch (the user's script did) and mostly waits while Tune starts,
so it runs ``data()`` in a thread as soon as it launches the hosts
(``proxy._prestart_hosts``), at the lowest CPU priority so that the processes
starting meanwhile get the cores first, and puts the result in Ray's object store; each
host, once its torch import is done, takes it from the experiment's registry
instead of calling ``data()`` itself. With many hosts the data is loaded once,
not once per host, and whatever ``data()`` imports stays out of every host's
memory (``benchmarks/RESULTS.md``, session 14, on 2 cores: one host started by
``max_concurrent()`` ready in 4.1-4.3 s instead of 5.9-6.0 s, four in 10.5-11.2 s
instead of 11.5-12.6 s, each host's memory 100 MB smaller; in a Tune sweep with
one host the first result comes no sooner there, as Tune's and the trial
server's start already fill both cores).

Only plain data travels this way: tensors and NumPy arrays on the CPU inside
tuples, lists and dicts (``data()``'s tensor forms), and ``TensorDataset`` objects
of them or ``Subset`` objects of those (``random_split``'s, as Tune's CIFAR
tutorial makes its sets), up to :data:`MAX_BYTES` in all. Anything else
(other datasets, factories, GPU tensors, a bigger set) or a ``data()`` that
raises in the driver is declined, and every
host calls ``data()`` itself, as with ``batched_trainable(data_in_driver=False)``:
a host's own error is then the one the user sees. (A set over 1 GiB is thus
loaded twice, once in vain: pass ``data_in_driver=False`` for those.)

The hand-off: the driver creates the registry with ``data_pending=True`` and
later calls ``offer_data([ref])`` (or ``offer_data(None)``); a host polls
``shared_data()`` (:func:`fetch`). Both methods run in their own concurrency
group, so a registry busy waiting for its hosts' start still answers them.

Imports no torch.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

import ray

logger = logging.getLogger(__name__)

MAX_BYTES = 1 << 30
"""The largest data the driver ships (1 GiB): bigger sets are loaded by each host, outside the object store."""

POLL_S = 0.02
WAIT_FOR_REGISTRY_S = 10.0  # the driver creates the registry right after launching the hosts
# A host waits for the driver's data() as it would for its own (which would take as long, and start no sooner):
# its start is bounded by batched_trainable(host_start_timeout_s=...) either way. Only a driver that never
# answers (a data() that hangs there alone) makes it load the data itself after this long.
WAIT_FOR_DATA_S = 3600.0

PENDING, READY, NONE = "pending", "ready", "none"


def plain_nbytes(obj: Any) -> int | None:
    """Bytes of ``obj`` if it is CPU tensors/arrays (or None) inside tuples, lists and dicts; else None."""
    if obj is None:
        return 0
    if isinstance(obj, (tuple, list)):
        sizes = [plain_nbytes(v) for v in obj]
        return None if any(s is None for s in sizes) else sum(sizes)
    if isinstance(obj, dict):
        sizes = [plain_nbytes(v) for v in obj.values()]
        return None if any(s is None for s in sizes) else sum(sizes)
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if kind == "torch.Tensor" or kind.startswith("torch.nn.parameter"):
        if obj.device.type != "cpu" or obj.is_sparse:
            return None
        return int(obj.untyped_storage().nbytes())  # a view is sent with its whole storage
    if kind == "numpy.ndarray":
        return int(obj.nbytes)
    # A TensorDataset, and random_split's Subsets of one: tensors and row numbers, nothing a host must build
    # itself (the exact classes only: a subclass may read files in __getitem__)
    if kind == "torch.utils.data.dataset.TensorDataset":
        return plain_nbytes(list(obj.tensors))
    if kind == "torch.utils.data.dataset.Subset":
        inner = plain_nbytes(obj.dataset)
        return None if inner is None else inner + 8 * len(obj.indices)
    return None


def load_in_driver(spec_bytes: bytes, registry: Any) -> threading.Thread:
    """Run the spec's ``data()`` in a daemon thread of the driver and offer the result to ``registry``."""
    thread = threading.Thread(target=_load_and_offer, args=(spec_bytes, registry), name="ray_modelbatch-data",
                              daemon=True)
    thread.start()
    return thread


def _yield_to_the_starting_processes() -> None:
    """Lower this thread's CPU priority (Linux nice 19, this thread only; no privileges needed).

    Why: while ``data()`` runs here, Ray starts the slot host's process, the
    registry's and the trial server's, and the host then imports torch; on a
    node with few cores they all compete for the same cores, and the host's
    start is what the first trial waits for. The data is needed only once the
    host has imported torch, so this thread can take the cores last. Measured
    in the MLP sweep on 2 cores (3 alternating pairs): the host's process
    started 1.4-1.5 s after ``fit()`` instead of 1.9-2.2 s and was ready at
    3.1-3.3 s instead of 3.6-4.0 s; ``data()`` took 1.9-2.1 s instead of
    1.6-1.7 s and was still in the object store before the host asked for it.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux (the call would change the whole process's priority)
        pass


def _load_and_offer(spec_bytes: bytes, registry: Any) -> None:
    if sys.platform.startswith("linux"):  # elsewhere setpriority() takes a process, not a thread
        _yield_to_the_starting_processes()
    box = None
    try:
        from ray import cloudpickle

        start = time.perf_counter()
        data = cloudpickle.loads(spec_bytes).data()
        size = plain_nbytes(data)
        if size is None:
            logger.debug("data() returned %s: each slot host loads it itself", type(data).__name__)
        elif size > MAX_BYTES:
            logger.info("data() returned %.1f GiB: each slot host loads it itself rather than through Ray's object "
                        "store", size / 2**30)
        else:
            box = [ray.put(data), time.perf_counter() - start]  # nested: the registry keeps the reference
        del data
    except Exception as exc:  # noqa: BLE001 - the hosts call data() themselves and report its error
        logger.debug("data() in the driver failed (%s: %s): each slot host loads it itself", type(exc).__name__, exc)
    try:
        registry.offer_data.remote(box)
    except Exception as exc:  # noqa: BLE001 - the registry is gone: its hosts are too
        logger.debug("could not offer the data to the registry: %s", exc)


def fetch(registry_name: str, namespace: str, wait_for_data_s: float = WAIT_FOR_DATA_S) -> tuple[Any, float] | None:
    """In a host: ``(data, seconds the driver's data() took)`` once the driver offered it; None to load it here.

    None when the registry says no data will come, when it cannot be found, or
    when the driver's ``data()`` is still running after ``wait_for_data_s``.
    """
    deadline = time.monotonic() + WAIT_FOR_REGISTRY_S
    while True:
        try:
            registry = ray.get_actor(registry_name, namespace=namespace)
            break
        except ValueError:
            if time.monotonic() > deadline:
                return None
            time.sleep(POLL_S)
    deadline = time.monotonic() + wait_for_data_s
    while True:
        try:
            state, box = ray.get(registry.shared_data.remote())
        except ray.exceptions.RayActorError:
            return None
        if state == READY:
            return ray.get(box[0]), box[1]
        if state == NONE or time.monotonic() > deadline:
            return None
        time.sleep(POLL_S)


class DataMailbox:
    """The registry's side: what the driver offered, for every host the registry or the driver starts."""

    def __init__(self, pending: bool) -> None:
        self.state = PENDING if pending else NONE
        self.box: list | None = None

    def offer(self, box: list | None) -> None:
        self.state, self.box = (READY, box) if box is not None else (NONE, None)

    def get(self) -> tuple[str, list | None]:
        return self.state, self.box
