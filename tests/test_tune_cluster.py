"""Placement across a simulated two-node cluster whose nodes declare one GPU each.

The compute runs on CPU (torch sees no CUDA device), but Ray schedules the
slot hosts by the declared GPUs, which is what placement is about.
"""

from __future__ import annotations

import pytest
import ray
from ray import tune
from ray.tune.schedulers import FIFOScheduler

import tune_helpers as h

SLOTS = 3


@pytest.fixture(scope="module")
def two_gpu_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=2, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@ray.remote(num_gpus=1, num_cpus=0)
class GpuHog:
    """Another job's actor holding a node's only GPU."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


class FreeGpuAfter(tune.Callback):
    """Kills the GPU hog once ``n`` results came in: that node's GPU becomes free mid-sweep."""

    def __init__(self, hog, n):
        self.hog, self.n, self.nodes_before = hog, n, set()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.n > 0:
            self.nodes_before.add(result["host_node"])
            self.n -= 1
            if self.n == 0:
                ray.kill(self.hog)


class SweepActorNodes(tune.Callback):
    """The nodes of the sweep's registry and trial server, seen at the first result."""

    def __init__(self):
        self.nodes: dict[str, str] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not self.nodes:
            for a in h.alive_actors():
                if a["ActorClassName"] in ("HostRegistry", "TrialServer"):
                    self.nodes[a["ActorClassName"]] = a["Address"]["NodeID"]


def test_one_host_per_gpu_on_every_node_created_as_gpus_free_up(two_gpu_nodes, tmp_path):
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    hog = GpuHog.remote()
    hogged = ray.get(hog.node.remote())
    T = h.make_trainable(slots_per_host=SLOTS, steps_per_report=h.K, idle_timeout_s=10.0)
    assert T.max_concurrent() == 2 * SLOTS  # one host per declared GPU
    watch, free, sweep_actors = h.HostWatch(T), FreeGpuAfter(hog, n=6), SweepActorNodes()
    try:
        grid, log = h.fit(T, {"lr": tune.grid_search([0.002 * (i + 1) for i in range(10)]), "seed": 0},
                          tmp_path, scheduler=FIFOScheduler(),
                          run_kw={"stop": {"training_iteration": 4}, "callbacks": [watch, free, sweep_actors]})
        assert h.errors(grid) == [] and len(grid) == 10
        # The registry (whose children the hosts are) and the trial server (every trial's actor, with two
        # hosts) are on the driver's node: losing another node costs only the trials of its host.
        driver_node = ray.get_runtime_context().get_node_id()
        assert sweep_actors.nodes == {"HostRegistry": driver_node, "TrialServer": driver_node}, sweep_actors.nodes
        assert all(r.metrics["training_iteration"] == 4 for r in grid)
        # Before the hog died, only the other node could host: the registry waited for the GPU
        # instead of blocking on a host that cannot be scheduled.
        assert free.nodes_before == nodes - {hogged}
        # Trials then landed on both nodes, one host per GPU, each within its capacity.
        assert {r.metrics["host_node"] for r in grid} == nodes
        hosts = {s["host"]: s for s in watch.samples}
        assert len(hosts) == 2 and {s["node_id"] for s in hosts.values()} == nodes
        for name in hosts:
            mine = [s for s in watch.samples if s["host"] == name]
            assert max(s["max_held"] for s in mine) <= SLOTS
            assert max(s["attached"] + s["reserved"] for s in mine) <= SLOTS
            assert not mine[-1]["in_placement_group"]  # never trapped in a trial's placement group
        trials_of = {}
        for r in grid:
            trials_of.setdefault(r.metrics["host"], set()).add(r.metrics["trial_id"])
        assert all(len(v) >= 2 for v in trials_of.values())  # both hosts did real work
        assert ray.get(ray.get_actor(f"ray_modelbatch:{T._experiment}:registry", namespace="ray_modelbatch").in_placement_group.remote()) is False
    finally:
        T.shutdown_hosts()


def test_hosts_per_gpu_share_each_gpu_and_every_one_trains(two_gpu_nodes, tmp_path):
    """``hosts_per_gpu=2``: two hosts on each declared GPU, each reserving half of it, all four training."""
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    T = h.make_trainable(slots_per_host=SLOTS, steps_per_report=h.K, idle_timeout_s=10.0, hosts_per_gpu=2,
                         host_cpus=0.5)  # two hosts per 2-CPU node still leave the trials a CPU
    assert T.max_concurrent() == 4 * SLOTS
    watch = h.HostWatch(T)
    try:
        grid, _ = h.fit(T, {"lr": tune.grid_search([0.002 * (i + 1) for i in range(8)]), "seed": 0}, tmp_path,
                        scheduler=FIFOScheduler(), run_kw={"stop": {"training_iteration": 2}, "callbacks": [watch]})
        assert h.errors(grid) == [] and len(grid) == 8
        assert all(r.metrics["training_iteration"] == 2 for r in grid)
        stats = T.host_stats()
        assert len(stats) == 4 and all(s["gpu_share"] == 2 for s in stats)
        per_node = {}
        for s in stats:
            per_node.setdefault(s["node_id"], []).append(s["host"])
        assert set(per_node) == nodes and all(len(v) == 2 for v in per_node.values())
        trials_of = {}
        for r in grid:
            trials_of.setdefault(r.metrics["host"], set()).add(r.metrics["trial_id"])
        assert len(trials_of) == 4  # every host trained some of them
        for name in trials_of:
            assert max(s["max_held"] for s in watch.samples if s["host"] == name) <= SLOTS
    finally:
        T.shutdown_hosts()


def test_auto_capacity_profiles_each_host_and_caps_trials(two_gpu_nodes, tmp_path):
    """``slots_per_host="auto"``: every host measures the model at two slot counts, fits a line and
    takes what fits (here capped by ``max_slots_per_host``, since CPU memory is large); Tune's
    concurrency follows the hosts' real capacity."""
    T = h.make_trainable(slots_per_host="auto", profile_config={"lr": 0.01, "hidden": 64}, max_slots_per_host=2,
                         steps_per_report=h.K, idle_timeout_s=10.0)
    watch = h.HostWatch(T)
    try:
        assert T.max_concurrent() == 4  # starts both hosts, each profiled to the cap of 2
        stats = T.host_stats()
        assert len(stats) == 2 and all(s["capacity"] == 2 for s in stats)
        # The two hosts started side by side: each constructor (torch, data(), the profile) began before
        # either had finished; one after the other, the second would begin only once the first was ready.
        starts = [s["milestones"] for s in stats]
        assert max(m["init"] for m in starts) < min(m["ready"] for m in starts), starts
        for s in stats:
            fit = s["capacity_fit"]
            assert "per slot" in fit and "slots" in fit, fit
        grid, _ = h.fit(T, {"lr": tune.grid_search([0.001 * (i + 1) for i in range(6)])}, tmp_path,
                        scheduler=FIFOScheduler(), run_kw={"stop": {"training_iteration": 2}, "callbacks": [watch]})
        assert h.errors(grid) == [] and len(grid) == 6
        assert max(s["max_held"] for s in watch.samples) <= 2
    finally:
        T.shutdown_hosts()


def test_auto_capacity_needs_a_profile_config_for_max_concurrent(two_gpu_nodes):
    T = h.make_trainable(slots_per_host="auto")
    with pytest.raises(ValueError, match="profile_config"):
        T.max_concurrent()
