"""Where trials' slots live: one registry per experiment places trials on slot hosts.

The registry is a named, detached actor created by the first proxy with
``scheduling_strategy="DEFAULT"``, so it is never trapped in a trial's
placement group and outlives the trial that happened to create it. Hosts are
planned one per GPU of every alive node (``hosts_per_gpu`` per GPU, each
reserving its fraction of it; ``cpu_hosts_per_node`` per node on CPU-only
clusters) and created, pinned to their node, on every place whose node has
the GPU (or CPUs) free: by the driver before the first trial (handed to the
new registry), and by the registry when a trial needs a slot. Hosts start side by side, and
the registry waits for all of them at once. A trial goes to the host with the
most free slots, so trials spread over GPUs before any host fills up. Hosts that die
(a crash, a lost node) are dropped, and their GPU is planned again.

When no trial has held a slot for ``idle_timeout_s``, the registry stops its
hosts and itself: nothing is left behind after ``fit()`` returns or raises,
or after the driver dies.

Imports no torch.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Collection

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..cpu_memory import allocator_env
from ..errors import SlotHostStartError, SweepSetupError
from . import balance, cpu_spread
from .host import SlotHost, default_threads, node_cpus
from . import ray_compat
from .ray_compat import available_resources_per_node
from .shared_data import DataMailbox

logger = logging.getLogger(__name__)


STARTUP_GRACE_S = 300.0  # how long hosts started before fit() wait for its first trial
# Ray threads of a host that also serves the trials' actor objects (shared_trials.HOST_TRIALS_MAX of them, each
# call holding a thread while it runs or waits its turn). Ray makes them all at once: 1,024 took 0.2 s and 10 MB
# more than 48 at an actor's start (2-core node).
HOST_THREADS = 1024


# Registries are detached actors; a named namespace keeps Ray from warning, on every experiment,
# that a detached actor in the driver's anonymous namespace cannot be found again.
NAMESPACE = "ray_modelbatch"


def registry_name(experiment: str) -> str:
    return f"ray_modelbatch:{experiment}:registry"


def registry_exists(experiment: str) -> bool:
    try:
        ray.get_actor(registry_name(experiment), namespace=NAMESPACE)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPlace:
    """One place a host may live: a GPU of a node (``gpu=True``), or a CPU-only node."""

    node_id: str | None
    index: int
    gpu: bool
    # Hosts sharing this place's device: on a CPU node its cores (see cpu_host_share), on a GPU the GPU
    # itself (``hosts_per_gpu``: each such host reserves 1/share of it, see gpu_fraction).
    share: int = field(default=1, compare=False)

    @property
    def label(self) -> str:
        node = (self.node_id or "any")[:8]
        if not self.gpu:
            return f"{node}-cpu{self.index}"
        if self.share > 1:
            return f"{node}-gpu{self.index // self.share}.{self.index % self.share}"
        return f"{node}-gpu{self.index}"


def gpu_fraction(place: HostPlace) -> float:
    """The part of a GPU a host on ``place`` reserves from Ray: 1 / the hosts sharing it (0 off GPUs)."""
    return 1.0 / max(1, int(place.share)) if place.gpu else 0.0


def check_hosts_per_gpu(value: Any) -> int:
    """An int of at least 1, else one line naming the argument and what it takes."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"batched_trainable(hosts_per_gpu={value!r}): give a whole number of at least 1 (slot "
                         "hosts that share each GPU)")
    return value


def plan_hosts(num_hosts: int | None = None, cpu_hosts_per_node: int | str = 1,
               spread: Collection[str] = (), hosts_per_gpu: int = 1) -> list[HostPlace]:
    """Every host the cluster can hold now: ``hosts_per_gpu`` per GPU of each alive node, else
    ``cpu_hosts_per_node`` per alive node (``"auto"``: one, or :data:`~.cpu_spread.AUTO_CPU_HOSTS` on the
    nodes in ``spread``)."""
    if num_hosts is not None:
        return [HostPlace(None, i, False) for i in range(int(num_hosts))]
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per = int(hosts_per_gpu)
    plan = [
        HostPlace(n["NodeID"], k * per + j, True, per)
        for n in nodes
        for k in range(int(n.get("Resources", {}).get("GPU", 0)))
        for j in range(per)
    ]
    if plan:
        return plan
    for n in nodes:
        cpus = float(n.get("Resources", {}).get("CPU", 1))
        share = cpu_spread.reservation_share(cpu_hosts_per_node, cpus)
        count = cpu_spread.hosts_on_cpu_node(cpu_hosts_per_node, cpus, n["NodeID"] in spread)
        plan += [HostPlace(n["NodeID"], k, False, share) for k in range(count)]
    return plan


def planned_hosts(options: dict, spread: Collection[str] = ()) -> list[HostPlace]:
    """:func:`plan_hosts` for a trainable's options."""
    return plan_hosts(options.get("num_hosts"), options.get("cpu_hosts_per_node", 1), spread,
                      options.get("hosts_per_gpu", 1))


def cpu_host_share(options: dict, place: HostPlace) -> int:
    """Into how many parts a host on ``place`` splits ``host_cpus``: the hosts its CPU node may run (1 for a
    GPU or an unpinned place), so that a later one still fits beside the trials' own reservations."""
    return 1 if place.gpu or options.get("num_hosts") is not None else max(1, int(place.share))


def cpu_thread_share(options: dict, place: HostPlace) -> int:
    """Into how many parts a host on ``place`` splits its node's cores from the start: ``cpu_hosts_per_node``
    when it is a number. With ``"auto"`` a node's first host starts with every core but one and takes its
    share when a second one joins it (:meth:`HostRegistry._watch_spread`); the joining one (index 1 and up,
    planned only then) starts with its share."""
    if options.get("cpu_hosts_per_node", 1) == "auto" and place.index == 0:
        return 1
    return cpu_host_share(options, place)


@dataclass
class StartingHost:
    """A host whose actor exists but whose constructor has not answered ``ping()`` yet."""

    place: HostPlace
    name: str
    handle: Any
    ready: Any  # the ping's ObjectRef
    serves_trials: bool = False  # it also holds trials' actor objects (see launch_where_free)


def launch_where_free(spec_bytes: bytes, experiment: str, options: dict, config: dict | None,
                      taken: set[HostPlace], first: int, any_running: bool,
                      spread: Collection[str] = (), warn: bool = True,
                      serves_trials: bool = False) -> tuple[list[StartingHost], str | None]:
    """Create (without waiting) a host on every planned place not in ``taken`` whose node has room now.

    Returns the hosts started, named ``host<first>``, ``host<first + 1>``, ...,
    and why no place had room (None when one had). Used by the registry and by
    the driver's prestart (:mod:`~ray_modelbatch.tune.proxy`). With no host
    running anywhere (``any_running`` False) and every CPU-only node's CPUs held,
    one host starts without a CPU reservation rather than never.

    Hosts never take the last CPUs the trials need: a trial's process needs its
    ``trial_resources`` (0.01 CPU) to start at all, and hosts that reserved every
    CPU of the cluster would leave every trial PENDING, the sweep hanging without
    a word (``num_hosts=2`` on a 2-CPU machine did). A host that would leave no
    trial room is not started, with one warning line naming the setting to
    change (``warn``: the registry's call says it; the driver's prestart, which
    the registry follows, keeps quiet); the only host starts unreserved instead.
    ``serves_trials``: the hosts will also hold the trials' actor objects
    (:mod:`~ray_modelbatch.tune.trial_table`), so they get the Ray threads for it.
    """
    avail = available_resources_per_node()  # None: unknown, try every place
    host_cpus = float(options.get("host_cpus", 1))
    trial_cpus = float((options.get("trial_resources") or {"CPU": 0.01}).get("CPU", 0.0))
    free_total = None if avail is None else sum(max(0.0, r.get("CPU", 0.0)) for r in avail.values())
    blocked: list[tuple[HostPlace, dict]] = []
    starved: list[HostPlace] = []
    places: list[tuple[HostPlace, float]] = []
    for place in planned_hosts(options, spread):
        if place in taken:
            continue
        cpus = host_cpus / cpu_host_share(options, place)
        gpus = gpu_fraction(place)
        res = avail.setdefault(place.node_id, {}) if place.node_id is not None and avail is not None else None
        if res is not None and (res.get("CPU", 0.0) < cpus or (place.gpu and res.get("GPU", 0.0) < gpus - 1e-9)):
            blocked.append((place, dict(res)))
            continue  # taken (e.g. by another experiment's idle host): try again at a later trial
        if free_total is not None and trial_cpus > 0 and free_total - cpus < trial_cpus:
            if places or any_running:
                starved.append(place)  # it would leave the trials no CPU: see the docstring
                continue
            cpus = 0.0  # the only host: unreserved, as on a node without free CPUs (below)
        if res is not None:  # what the hosts launched here take from their node: several start at once
            res["CPU"] = res.get("CPU", 0.0) - cpus
            res["GPU"] = res.get("GPU", 0.0) - gpus
        if free_total is not None:
            free_total -= cpus
        places.append((place, cpus))
    if starved and warn:
        _warn_starved(experiment, len(starved), host_cpus, trial_cpus)
    reason = _blocked(blocked, host_cpus) if blocked and not places else None
    cpu_only = [p for p, res in blocked if not p.gpu]
    if not places and not any_running and cpu_only and host_cpus > 0:
        logger.warning("%s Starting the slot host without a CPU reservation instead.", reason)
        places.append((cpu_only[0], 0))
    launched = [launch_host(spec_bytes, experiment, options, place, first + i, config, num_cpus,
                            serves_trials=serves_trials)
                for i, (place, num_cpus) in enumerate(places)]
    return launched, None if launched else reason


def launch_host(spec_bytes: bytes, experiment: str, options: dict, place: HostPlace, index: int,
                config: dict | None, num_cpus: float, serves_trials: bool = False) -> StartingHost:
    """Create host ``index`` of the experiment on ``place``, reserving ``num_cpus``, and ask for its ``ping()``;
    its constructor runs meanwhile."""
    name = f"ray_modelbatch:{experiment}:host{index}"
    slots = options["slots_per_host"]
    threads = 2 * (options["max_slots_per_host"] if slots == "auto" else slots) + 16  # every waiting step holds one
    opts: dict[str, Any] = {
        "name": name,
        "max_concurrency": max(threads, HOST_THREADS) if serves_trials else threads,
        "num_cpus": num_cpus,
        "num_gpus": gpu_fraction(place),
        "max_restarts": 0,
        "scheduling_strategy": "DEFAULT"
        if place.node_id is None
        else NodeAffinitySchedulingStrategy(place.node_id, soft=False),
    }
    env = allocator_env()  # the engine thread's big tensors stay in the process (see cpu_memory)
    if env:
        opts["runtime_env"] = {"env_vars": env}  # merged with the job's runtime_env by Ray
    handle = ray.remote(SlotHost).options(**opts).remote(
        spec_bytes, name, slots, lease_check_s=options.get("lease_check_s", 2.0),
        stats_every_s=options.get("stats_every_s", 5.0),
        profile_config=options.get("profile_config") or config,
        max_slots=options["max_slots_per_host"],
        run_ahead=options.get("run_ahead", 2), threads=options.get("host_threads"),
        move_slots=options.get("move_slots", True),
        node_share=cpu_thread_share(options, place), gpu_share=place.share if place.gpu else 1,
        step_threshold_ms=options.get("kernel_bound_step_ms"),
        data_from=registry_name(experiment) if options.get("data_in_driver", True) else None,
    )
    return StartingHost(place, name, handle, handle.ping.remote(), serves_trials)


_STARVED_WARNED: set[str] = set()  # experiments this process has warned about (see launch_where_free)


def _warn_starved(experiment: str, count: int, host_cpus: float, trial_cpus: float) -> None:
    """Once per experiment and process: hosts that were not started because the trials need the CPUs."""
    if experiment in _STARVED_WARNED:
        return
    _STARVED_WARNED.add(experiment)
    logger.warning(
        "%d more slot host(s) not started: with host_cpus=%g each they would leave the trials (%g CPU each) no "
        "CPU of this Ray cluster, and no trial could start. The sweep runs on the hosts that fit; for more, "
        "lower batched_trainable(host_cpus=...) (a host computes with its node's cores whatever it reserves: "
        "host_threads) or add CPUs.", count, host_cpus, trial_cpus)


def _blocked(blocked: list[tuple[HostPlace, dict]], cpus: float) -> str:
    """One line: why no slot host fits on the cluster now, and which setting to change."""
    gpus = max(gpu_fraction(p) for p, _ in blocked)
    need = f"{cpus:g} CPU" + (f" and {gpus:g} GPU" if gpus else "")
    free = ", ".join(f"{p.label}: {res.get('CPU', 0.0):g} CPU" + (f" {res.get('GPU', 0.0):g} GPU" if p.gpu else "")
                     for p, res in blocked[:4])
    return (f"no node has {need} free for a slot host (free now: {free}); trials or other actors hold the rest. "
            "A batched trial's process does no training and needs only {'CPU': 0.01}: drop tune.with_resources "
            "around the trainable (or use batched_trainable(trial_resources=...)), lower "
            "batched_trainable(host_cpus=...), or free the GPUs other actors hold (the idle hosts of an earlier "
            "fit() of this driver free theirs idle_timeout_s after it, 20 s by default; its "
            "trainable.shutdown_hosts() frees them at once).")


class HostRegistry:
    """Assigns trials to hosts with free slots, creating hosts lazily where the cluster has room."""

    def __init__(self, spec_bytes: bytes, experiment: str, options: dict, starting: list[StartingHost] | None = None,
                 data_pending: bool = False):
        self.spec_bytes = spec_bytes
        self.experiment = experiment
        self.options = options
        self.hosts: dict[HostPlace, tuple[str, Any]] = {}
        self.slots: dict[HostPlace, int] = {}  # each host's capacity (it may profile its own device)
        # Hosts the driver created before this registry existed (see proxy._prestart_hosts): registered
        # by the first start_hosts() or assign().
        self._starting = list(starting or [])
        # host names are never reused: a dead host's name may still be registered
        self._created = len(self._starting)
        self.last_busy = time.monotonic()
        self._assigned = False  # before the first trial, hosts started early wait for fit() (see _idle_watch)
        # Why a host could not start (data() failed, not one slot fits): every later trial gets the same
        # one-line error at once, instead of starting (and failing) a host of its own.
        self.start_error: str | None = None
        self.blocked_reason: str | None = None  # why no host could be placed, last time one was tried
        self._lock = threading.RLock()  # the idle watch holds it through its decision and shutdown()
        self._data = DataMailbox(data_pending)  # the driver's data() for the hosts (see shared_data)
        # cpu_hosts_per_node="auto" (see cpu_spread): CPU nodes whose first host found its steps
        # kernel-bound, nodes judged either way, and hosts started there that have not answered yet.
        self.spread: set[str] = set()
        self._judged: set[str] = set()
        self._joining: list[tuple[StartingHost, float]] = []
        self._spread_config: dict | None = None  # the last trial's config (a new host may profile it)
        self._held_since: dict[str, float] = {}  # node -> when a trial first waited for its spread (_holds_back)
        self._standby: dict[str, list[tuple[StartingHost, float]]] = {}  # node -> its second host, before the verdict
        self.moves = 0  # slots moved between hosts (see balance)
        threading.Thread(target=self._idle_watch, daemon=True).start()

    @ray.method(concurrency_group="data")
    def offer_data(self, box: list | None) -> None:
        """The driver's ``data()`` result (``[ref, seconds]``), or None: every host loads its own."""
        self._data.offer(box)

    @ray.method(concurrency_group="data")
    def shared_data(self) -> tuple[str, list | None]:
        """For a starting host: ``("ready", [ref, seconds])``, ``("pending", None)`` or ``("none", None)``.

        In its own concurrency group: the registry's one main thread may be waiting
        for this very host's start (:meth:`_await_hosts`)."""
        return self._data.get()

    def capacity(self) -> int:
        """Slots of the running hosts, plus the planned ones (as large as the largest running one)."""
        planned = planned_hosts(self.options, self.spread)
        per = self.options["slots_per_host"]
        per = max(self.slots.values(), default=0) if per == "auto" else int(per)
        return sum(self.slots.values()) + per * sum(1 for p in planned if p not in self.hosts)

    def start_hosts(self, config: dict, quiet: bool = False) -> int:
        """Start a host on every planned place that has room now; returns :meth:`capacity`.

        ``quiet``: a host that cannot start raises nothing here (nobody waits on a
        prestart); the first trial to ask for a slot gets the error instead. Once
        a host's start failed for the sweep's own reason (``data()`` raised, not
        one slot fits), no other host is started: every trial gets that error.
        """
        with self._lock:
            self.last_busy = time.monotonic()
            self._free_by_host()
            try:
                self._settle_starting()
                if self.start_error is not None:
                    raise SweepSetupError(self.start_error)
                while self._create_where_free(config) is not None:
                    pass
            except (SlotHostStartError, SweepSetupError):
                if not quiet:
                    raise
            return self.capacity()

    def _settle_starting(self) -> None:
        """Register (or drop) the hosts the driver created before this registry."""
        if self._starting:
            starting, self._starting = self._starting, []
            self._await_hosts(starting)

    def in_placement_group(self) -> bool:
        """False by design: a registry inside a trial's placement group would die with that trial."""
        return ray.util.get_current_placement_group() is not None

    def host_handles(self) -> list[tuple[str, Any]]:
        return list(self.hosts.values())

    def assign(self, key: str, config: dict | None = None, prefer: str | None = None) -> tuple[str, Any] | None:
        """Reserve a slot for attachment ``key`` on the host with most free slots; None if none is free.

        A place of the plan that has no host yet counts as fully free, so a new
        host (on a free GPU) is preferred over filling up a running one. ``config``
        is the trial's: a new host with ``slots_per_host="auto"`` profiles it,
        unless the trainable names a ``profile_config``. ``prefer`` names the host
        a moving slot goes to (see :mod:`.balance`): tried first, if it still runs.
        """
        with self._lock:
            self.last_busy = time.monotonic()
            self._assigned = True
            self._settle_starting()
            if self.start_error is not None:
                raise SweepSetupError(self.start_error)
            self._spread_config = config  # the idle watch judges the hosts with it between assigns
            self._watch_spread(config)
            free = self._free_by_host()
            if all(free[p] < self.slots[p] for p in free):
                created = self._create_where_free(config)  # every host has trials: spread to a free GPU
                if created is not None:
                    free[created] = self.slots[created]
            order = sorted(free, key=lambda p: (self.hosts[p][0] != prefer, -free[p]))
            # The counts may be stale by now; the host's reserve() decides, and counts a refusal.
            for place in [p for p in order if free[p] > 0] or order[:1]:
                if prefer is None and self._holds_back(place, free):
                    continue
                if ray.get(self.hosts[place][1].reserve.remote(key)):
                    return self.hosts[place]
            return None

    def _holds_back(self, place: HostPlace, free: dict[HostPlace, int]) -> bool:
        """With ``cpu_hosts_per_node="auto"``: whether a trial waits rather than joining ``place``'s host,
        because the node may soon have a second host (see :mod:`.cpu_spread`).

        Until a CPU node's first host has judged its steps, and, if it found them
        kernel-bound, until the second host is up, that host takes only
        :data:`~.cpu_spread.JUDGING_TRIALS` trials; the others wait (their proxies
        ask again every 0.2 s), at most :data:`~.cpu_spread.HOLD_BACK_S` seconds.
        Trials that arrive together at a sweep's start then split between the two
        hosts instead of all staying on the first while the second idles.
        """
        node = place.node_id
        if place.gpu or node is None or not self._spreads_itself():
            return False
        pending = node not in self._judged or any(s.place.node_id == node for s, _ in self._joining)
        if not pending or cpu_spread.hosts_on_cpu_node("auto", node_cpus(node) or 1, spread=True) < 2:
            return False
        if self.slots[place] - free[place] < cpu_spread.JUDGING_TRIALS:
            return False
        since = self._held_since.setdefault(node, time.monotonic())
        return time.monotonic() - since < cpu_spread.HOLD_BACK_S

    def holding_back(self) -> bool:
        """Whether trials wait for a CPU node's second host now (:meth:`_holds_back`): not a full sweep."""
        with self._lock:
            return any(time.monotonic() - t < cpu_spread.HOLD_BACK_S for t in self._held_since.values())

    def _free_by_host(self) -> dict[HostPlace, int]:
        """Free slots of every live host; hosts that died are dropped so their place is planned again."""
        places = list(self.hosts)
        refs = [self.hosts[p][1].free_slots.remote() for p in places]
        free: dict[HostPlace, int] = {}
        for place, ref in zip(places, refs):
            try:
                free[place] = ray.get(ref, timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                name, handle = self.hosts.pop(place)
                self.slots.pop(place, None)
                logger.warning("slot host %s is gone (%s); its trials restart from their checkpoints",
                               name, type(exc).__name__)
                ray.kill(handle, no_restart=True)
        return free

    def _create_where_free(self, config: dict | None) -> HostPlace | None:
        """Start a host on every planned place without one whose node has the resources free now.

        The hosts start side by side: each is created at once and the registry
        then waits for all of them, so a node with eight GPUs is ready in one
        host's start (the torch import, ``data()``, a profile) rather than
        eight in a row. Returns one place that got a running host, or None.

        When no host runs yet and every CPU-only node's CPUs are held (by trials
        that asked for more than the proxy needs, e.g. ``tune.with_resources``),
        the host starts without a CPU reservation rather than never: proxies
        sleep while the host computes. A GPU place needs its GPU free; while none
        is, :meth:`waiting_reason` says why, for the trial's error.
        """
        started = self._await_hosts(self._launch_where_free(config))
        return started[0] if started else None

    def _launch_where_free(self, config: dict | None) -> list[StartingHost]:
        """Create (without waiting for) a host on every free planned place; see :meth:`_create_where_free`."""
        taken = set(self.hosts) | {s.place for s, _ in self._joining}
        launched, self.blocked_reason = launch_where_free(self.spec_bytes, self.experiment, self.options, config,
                                                          taken=taken, first=self._created,
                                                          any_running=bool(self.hosts), spread=self.spread)
        self._created += len(launched)
        return launched

    def _watch_spread(self, config: dict | None) -> None:
        """With ``cpu_hosts_per_node="auto"``: give a CPU node its second host once its first one found its
        fused steps kernel-bound (see :mod:`.cpu_spread`), and register such hosts once they answer.

        The new host starts without anyone waiting for it: trials keep attaching
        to the running host meanwhile, and the first to come after it answered
        goes to it (it has the most free slots). The node's running hosts take
        their share of its cores from then on.
        """
        if not self._spreads_itself():
            return
        self._settle_joining()
        for place, handle in self._unjudged():
            node = place.node_id
            if node in self._judged:  # judged a moment ago through another of its hosts
                continue
            self._start_standby(node, config)
            try:
                verdict = ray.get(handle.kernel_bound.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                continue  # _free_by_host drops it
            if verdict is None:
                continue
            self._judged.add(node)
            standby = self._standby.pop(node, [])
            if not verdict:
                for s, _ in standby:
                    ray.kill(s.handle, no_restart=True)
                continue
            self.spread.add(node)
            threads = default_threads(int(node_cpus(node) or 1), cpu_spread.AUTO_CPU_HOSTS)
            for p, (_, h) in self.hosts.items():
                if p.node_id == node:
                    h.set_threads.remote(threads)
            started = time.monotonic()
            joining = [(s, t) for s, t in standby] or [(s, started) for s in self._launch_where_free(config)]
            self._joining += joining
            logger.info("slot host on %s steps kernel-bound stacks: %d more join it on its node",
                        place.label, len(joining))
        self._settle_joining()  # a standby host that is up already takes trials now

    def _start_standby(self, node: str, config: dict | None) -> None:
        """Start the second host of a CPU node whose first host has yet to judge its steps: it is up by the
        verdict, and registered only if the steps are kernel-bound (else stopped unused). Started
        once the first host is up, not beside it: two hosts starting at once share the node's cores."""
        if node in self._standby or (node_cpus(node) or 1) < 2:
            return
        spread = {*self.spread, node}
        elsewhere = {p for p in planned_hosts(self.options, spread) if p.node_id != node}  # only this node's
        taken = set(self.hosts) | {s.place for s, _ in self._joining} | elsewhere
        launched, _ = launch_where_free(self.spec_bytes, self.experiment, self.options, config, taken=taken,
                                        first=self._created, any_running=True, spread=spread, warn=False)
        self._created += len(launched)
        self._standby[node] = [(s, time.monotonic()) for s in launched]

    def _settle_joining(self) -> None:
        """Register the joining hosts that answered, waiting for none; drop one that is not up after its start
        timeout. A joining host is an extra: its failure is logged, and fails no trial."""
        if not self._joining:
            return
        timeout = float(self.options.get("host_start_timeout_s", 120.0))
        ready, _ = ray.wait([s.ready for s, _ in self._joining], num_returns=len(self._joining), timeout=0)
        answered = [s for s, _ in self._joining if s.ready in ready]
        late = [s for s, t in self._joining if s not in answered and time.monotonic() - t > timeout]
        self._joining = [(s, t) for s, t in self._joining if s not in answered and s not in late]
        for s in late:
            ray.kill(s.handle, no_restart=True)
            logger.warning("slot host %s on %s did not start within %.0fs; its node keeps its other host",
                           s.name, s.place.label, timeout)
        if answered:
            error = self.start_error
            try:
                self._await_hosts(answered)
            except (SlotHostStartError, SweepSetupError) as exc:
                self.start_error = error  # the node's running host still serves every trial
                logger.warning("a second slot host could not start (%s); its node keeps its other host", exc)

    def waiting_reason(self) -> str | None:
        """Why a trial cannot get a slot now, if the cause is resources rather than full hosts."""
        with self._lock:
            return self.blocked_reason if not self.hosts else None

    def _await_hosts(self, starting: list[StartingHost]) -> list[HostPlace]:
        """Wait for hosts created by :func:`launch_host`, all at once; register those that started.

        A host that does not answer within ``host_start_timeout_s`` is killed
        and its place tried again later. A host that died while starting, or
        whose start failed (``data()`` raised, not one slot fits), is reported
        after the others are settled: the trial that asked gets a plain error.
        """
        timeout = float(self.options.get("host_start_timeout_s", 120.0))
        deadline = time.monotonic() + timeout
        pending = {s.ready: s for s in starting}
        started: list[HostPlace] = []
        failure: Exception | None = None
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                for s in pending.values():
                    ray.kill(s.handle, no_restart=True)
                    logger.warning("slot host %s on %s did not start within %.0fs; trying again later",
                                   s.name, s.place.label, timeout)
                break
            s = pending.pop(done[0])
            try:
                info = ray.get(s.ready)
            except ray.exceptions.RayActorError as exc:
                # The host died while starting: a plain error for the trial that asked, not an actor
                # error its proxy would retry.
                failure = failure or SlotHostStartError(
                    f"slot host {s.name} on {s.place.label} could not start: {exc}")
                continue
            if info.get("error"):
                if not s.serves_trials:  # else it holds the trials that get this error: it ends with fit()
                    ray.kill(s.handle, no_restart=True)
                self.start_error = f"slot host could not start: {info['error']}"
                logger.error("%s", self.start_error)
                failure = failure or SweepSetupError(self.start_error)
                continue
            self.hosts[s.place] = (s.name, s.handle)
            self.slots[s.place] = int(info["capacity"])
            started.append(s.place)
            logger.info("created slot host %s on %s (%d slots, %s)%s", s.name, s.place.label, info["capacity"],
                        info["device"], f": {info['capacity_fit']}" if info.get("capacity_fit") else "")
        if failure is not None:
            raise failure
        return started

    def stats(self) -> list[dict]:
        return ray.get([h.stats.remote() for _, h in self.hosts.values()])

    def shutdown(self) -> None:
        """Stop every host of this experiment, then this registry."""
        with self._lock:
            for _, h in self.hosts.values():
                try:
                    ray.get(h.shutdown.remote(), timeout=15)
                except Exception:  # noqa: BLE001 - a dead host is already what we want
                    pass
                ray.kill(h, no_restart=True)
            for s, _ in [*self._joining, *(x for standby in self._standby.values() for x in standby)]:
                ray.kill(s.handle, no_restart=True)
            self._standby = {}
            self.hosts, self.slots, self._joining = {}, {}, []
        ray.kill(ray.get_runtime_context().current_actor)

    SPREAD_WATCH_S = 0.2  # the watch's tick while a CPU node's spread is pending (see _spread_pending)

    def _balance(self) -> None:
        """Ask a host that is behind its slots to hand some to a host that idles (see :mod:`.balance`)."""
        places = list(self.hosts)
        refs = [self.hosts[p][1].load.remote() for p in places]
        loads = []
        for ref in refs:
            try:
                loads.append(balance.HostLoad(**ray.get(ref, timeout=10)))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                return  # a host is gone or stuck: _free_by_host sorts it out first
        move = balance.plan_move(loads)
        if move is None:
            return
        donor = next(h for name, h in self.hosts.values() if name == move.donor)
        trials = ray.get(donor.release.remote(move.receiver, list(move.stacks), move.count), timeout=10)
        self.moves += len(trials)
        if trials:
            logger.info("registry %s: trials %s move from %s to %s", self.experiment, trials, move.donor,
                        move.receiver)

    def _spread_pending(self) -> bool:
        """Whether a CPU node's first host has yet to judge its steps, or a joining host to be registered.

        Meanwhile the watch looks five times a second instead of once, so a CNN
        sweep's second host starts within 0.2 s of the first host's verdict and
        is registered within 0.2 s of answering (up to a second each at one look
        a second). Measured on 2 cores, three alternating CNN sweeps: the second
        host's constructor began 4.0-4.3 s after ``fit()`` against 4.1-5.3 s; the
        sweep's wall time did not move beyond its noise.
        """
        return self._spreads_itself() and (bool(self._joining) or bool(self._unjudged()))

    def _spreads_itself(self) -> bool:
        """``cpu_hosts_per_node="auto"`` without a fixed ``num_hosts``: CPU nodes get a second host as they need."""
        return self.options.get("cpu_hosts_per_node", 1) == "auto" and self.options.get("num_hosts") is None

    def _unjudged(self) -> list[tuple[HostPlace, Any]]:
        """The hosts of CPU nodes whose steps were not judged yet (see :meth:`_watch_spread`)."""
        return [(p, handle) for p, (_, handle) in list(self.hosts.items())
                if not p.gpu and p.node_id is not None and p.node_id not in self._judged]

    def _idle_watch(self) -> None:
        timeout = float(self.options.get("idle_timeout_s", 60.0))
        tick = min(1.0, timeout / 4)
        while True:
            time.sleep(tick)
            # Decide and stop under the lock: an assign() that slipped in between a count of
            # zero used slots and shutdown() would hand out a host that is about to be killed.
            with self._lock:
                if self._assigned:
                    # A node whose host found its steps kernel-bound gets its second host now, not at the
                    # next trial's assign (in a CNN sweep, when ASHA first stopped a trial).
                    try:
                        self._watch_spread(self._spread_config)
                    except Exception:  # noqa: BLE001 - the next assign tries again; this watch must keep running
                        logger.exception("registry %s: judging its hosts' steps failed", self.experiment)
                tick = min(self.SPREAD_WATCH_S if self._assigned and self._spread_pending() else 1.0, timeout / 4)
                if self._assigned and len(self.hosts) >= 2 and self.options.get("move_slots", True):
                    try:
                        self._balance()
                    except Exception:  # noqa: BLE001 - a missed move costs time, never a trial; look again next tick
                        logger.exception("registry %s: balancing its hosts failed", self.experiment)
                free = self._free_by_host()
                used = sum(self.slots[p] - f for p, f in free.items())
                if used:
                    self.last_busy = time.monotonic()
                # Hosts started by max_concurrent() before fit(): a slow Tune start (or a slow profile)
                # must not find them stopped, so the first trial gets a longer grace.
                elif time.monotonic() - self.last_busy > (timeout if self._assigned else max(timeout, STARTUP_GRACE_S)):
                    logger.info("registry %s idle for %.0fs: stopping its hosts", self.experiment, timeout)
                    self.shutdown()
                    return


def get_registry(spec_bytes: bytes, experiment: str, options: dict, starting: list[StartingHost] | None = None,
                 data_pending: bool = False) -> Any:
    """The experiment's registry, created on first use outside any placement group.

    ``starting``: hosts the caller already created (:func:`launch_where_free`)
    for a registry that does not exist yet; ``data_pending``: the caller will
    offer the data (:func:`~ray_modelbatch.tune.shared_data.load_in_driver`).
    An existing registry ignores both.
    """
    return (
        ray.remote(concurrency_groups={"data": 1})(HostRegistry)  # offer_data/shared_data: see shared_data
        .options(
            name=registry_name(experiment),
            get_if_exists=True,
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=0,
            scheduling_strategy=ray_compat.on_this_node_if_driver(),  # out of placement groups, by the driver
            max_concurrency=1,
        )
        .remote(spec_bytes, experiment, options, starting, data_pending)
    )
