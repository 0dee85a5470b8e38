"""Where trials' slots live: one registry per experiment places trials on slot hosts.

The registry is a named, detached actor created by the first proxy with
``scheduling_strategy="DEFAULT"``, so it is never trapped in a trial's
placement group and outlives the trial that happened to create it. It creates
hosts on demand (one per GPU, or one per node on CPU-only clusters, pinned to
that node), so hosts are owned by the registry and die with it. When no trial
has held a slot for ``idle_timeout_s``, the registry stops its hosts and
itself: nothing is left behind after ``fit()`` returns or the driver dies.

Imports no torch.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .host import SlotHost

logger = logging.getLogger(__name__)


def registry_name(experiment: str) -> str:
    return f"ray_modelbatch:{experiment}:registry"


def plan_hosts(num_hosts: int | None = None) -> list[dict[str, Any]]:
    """One entry per host the cluster can hold: one per GPU, else one per alive node."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if num_hosts is not None:
        return [{"node_id": None, "gpu": False} for _ in range(int(num_hosts))]
    plan = [
        {"node_id": n["NodeID"], "gpu": True}
        for n in nodes
        for _ in range(int(n.get("Resources", {}).get("GPU", 0)))
    ]
    return plan or [{"node_id": n["NodeID"], "gpu": False} for n in nodes]


class HostRegistry:
    """Assigns trials to hosts with free slots, creating hosts lazily up to the cluster's plan."""

    def __init__(self, spec_bytes: bytes, experiment: str, options: dict):
        self.spec_bytes = spec_bytes
        self.experiment = experiment
        self.options = options
        self.plan = plan_hosts(options.get("num_hosts"))
        self.hosts: list[tuple[str, Any]] = []
        self.last_busy = time.monotonic()
        self._lock = threading.RLock()  # the idle watch holds it through its decision and shutdown()
        threading.Thread(target=self._idle_watch, daemon=True).start()

    def capacity(self) -> int:
        return len(self.plan) * int(self.options["slots_per_host"])

    def host_handles(self) -> list[tuple[str, Any]]:
        return list(self.hosts)

    def assign(self, key: str) -> tuple[str, Any] | None:
        """Reserve a slot for attachment ``key``: on the host with most free slots, or on a new host."""
        with self._lock:
            self.last_busy = time.monotonic()
            free = ray.get([h.free_slots.remote() for _, h in self.hosts]) if self.hosts else []
            for _, (name, h) in sorted(zip(free, self.hosts), key=lambda p: -p[0]):
                if ray.get(h.reserve.remote(key)):
                    return name, h
            if len(self.hosts) < len(self.plan):
                name, h = self._create(len(self.hosts))
                if ray.get(h.reserve.remote(key)):
                    return name, h
            return None

    def _create(self, i: int) -> tuple[str, Any]:
        entry = self.plan[i]
        name = f"ray_modelbatch:{self.experiment}:host{i}"
        slots = int(self.options["slots_per_host"])
        opts: dict[str, Any] = {
            "name": name,
            "max_concurrency": 2 * slots + 16,  # every waiting step holds a thread
            "num_cpus": self.options.get("host_cpus", 1),
            "num_gpus": 1 if entry["gpu"] else 0,
            "max_restarts": 0,
        }
        if entry["node_id"] is not None:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(entry["node_id"], soft=False)
        else:
            opts["scheduling_strategy"] = "DEFAULT"
        handle = ray.remote(SlotHost).options(**opts).remote(
            self.spec_bytes, name, slots, lease_check_s=self.options.get("lease_check_s", 2.0),
            stats_every_s=self.options.get("stats_every_s", 5.0),
        )
        ray.get(handle.ping.remote())  # surface a host that cannot start (e.g. its data loader fails)
        self.hosts.append((name, handle))
        logger.info("created slot host %s (%d slots, gpu=%s)", name, slots, entry["gpu"])
        return name, handle

    def stats(self) -> list[dict]:
        return ray.get([h.stats.remote() for _, h in self.hosts])

    def shutdown(self) -> None:
        """Stop every host of this experiment, then this registry."""
        with self._lock:
            for _, h in self.hosts:
                try:
                    ray.get(h.shutdown.remote(), timeout=15)
                except Exception:  # noqa: BLE001 - a dead host is already what we want
                    pass
                ray.kill(h)
            self.hosts = []
        ray.kill(ray.get_runtime_context().current_actor)

    def _idle_watch(self) -> None:
        timeout = float(self.options.get("idle_timeout_s", 60.0))
        while True:
            time.sleep(min(1.0, timeout / 4))
            # Decide and stop under the lock: an assign() that slipped in between a count of
            # zero used slots and shutdown() would hand out a host that is about to be killed.
            with self._lock:
                hosts = list(self.hosts)
                try:
                    used = sum(
                        self.options["slots_per_host"] - f
                        for f in ray.get([h.free_slots.remote() for _, h in hosts], timeout=10)
                    )
                except Exception:  # noqa: BLE001 - a host died; treat as busy, recovery is the trials' job
                    used = 1
                if used:
                    self.last_busy = time.monotonic()
                elif time.monotonic() - self.last_busy > timeout:
                    logger.info("registry %s idle for %.0fs: stopping its hosts", self.experiment, timeout)
                    self.shutdown()
                    return


def get_registry(spec_bytes: bytes, experiment: str, options: dict) -> Any:
    """The experiment's registry, created on first use outside any placement group."""
    return (
        ray.remote(HostRegistry)
        .options(
            name=registry_name(experiment),
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            scheduling_strategy="DEFAULT",
            max_concurrency=1,
        )
        .remote(spec_bytes, experiment, options)
    )
