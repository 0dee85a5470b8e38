"""Which hosts the registry (or the driver) starts at once: never more than a node's free resources hold.

Hosts start side by side (``registry.launch_where_free`` creates every one,
then the caller waits for all), so the free CPUs and GPUs a node reports must
be shared among the hosts launched in the same call.
"""

from __future__ import annotations

import pytest

from ray_modelbatch.tune import registry as reg


@pytest.fixture
def launches(monkeypatch):
    made = []

    def fake_launch(spec_bytes, experiment, options, place, index, config, num_cpus=None):
        made.append((place, index, num_cpus))
        return reg.StartingHost(place, f"host{index}", None, None)

    monkeypatch.setattr(reg, "launch_host", fake_launch)
    return made


def _cluster(monkeypatch, nodes: dict[str, dict[str, float]], gpus: dict[str, int]) -> None:
    plan = [reg.HostPlace(n, k, True) for n, g in gpus.items() for k in range(g)]
    plan += [reg.HostPlace(n, 0, False) for n, g in gpus.items() if g == 0]
    monkeypatch.setattr(reg, "plan_hosts", lambda num_hosts=None: plan)
    monkeypatch.setattr(reg, "available_resources_per_node", lambda: {n: dict(r) for n, r in nodes.items()})


OPTIONS = {"host_cpus": 1, "slots_per_host": 4, "max_slots_per_host": 4}


def test_hosts_launched_together_share_their_nodes_cpus(monkeypatch, launches):
    # 4 GPUs but 2 free CPUs: two hosts of 1 CPU fit; the others wait for a later call.
    _cluster(monkeypatch, {"a": {"CPU": 2.0, "GPU": 4.0}}, {"a": 4})
    started, reason = reg.launch_where_free(b"", "exp", OPTIONS, None, taken=set(), first=3, any_running=False)
    assert [(p.index, i) for p, i, _ in launches] == [(0, 3), (1, 4)]  # named on from `first`
    assert len(started) == 2 and reason is None


def test_hosts_launched_together_share_their_nodes_gpus(monkeypatch, launches):
    _cluster(monkeypatch, {"a": {"CPU": 8.0, "GPU": 1.0}, "b": {"CPU": 8.0, "GPU": 2.0}}, {"a": 2, "b": 2})
    reg.launch_where_free(b"", "exp", OPTIONS, None, taken=set(), first=0, any_running=False)
    assert sorted((p.node_id, p.index) for p, _, _ in launches) == [("a", 0), ("b", 0), ("b", 1)]


def test_places_with_a_host_are_skipped_and_a_full_node_says_why(monkeypatch, launches):
    _cluster(monkeypatch, {"a": {"CPU": 0.0, "GPU": 1.0}}, {"a": 2})
    taken = {reg.HostPlace("a", 0, True)}
    started, reason = reg.launch_where_free(b"", "exp", OPTIONS, None, taken=taken, first=1, any_running=True)
    assert started == [] and launches == []
    assert "no node has 1 CPU and 1 GPU free" in reason


def test_a_cpu_node_without_free_cpus_still_gets_its_first_host_unreserved(monkeypatch, launches):
    _cluster(monkeypatch, {"a": {"CPU": 0.5}}, {"a": 0})
    started, reason = reg.launch_where_free(b"", "exp", OPTIONS, None, taken=set(), first=0, any_running=False)
    assert [(p.node_id, n) for p, _, n in launches] == [("a", 0)] and reason is None
    launches.clear()  # with a host running elsewhere, no unreserved one is added
    started, reason = reg.launch_where_free(b"", "exp", OPTIONS, None, taken=set(), first=1, any_running=True)
    assert started == [] and launches == [] and "no node has 1 CPU free" in reason
