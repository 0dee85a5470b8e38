"""Which hosts the registry (or the driver) starts at once: never more than a node's free resources hold.

Hosts start side by side (``registry.launch_where_free`` creates every one,
then the caller waits for all), so the free CPUs and GPUs a node reports must
be shared among the hosts launched in the same call. The driver's prestart
launches the hosts of a registry that does not exist yet and hands them over.
"""

from __future__ import annotations

import pytest

from ray_modelbatch.tune import registry as reg


@pytest.fixture
def launches(monkeypatch):
    made = []

    def fake_launch(spec_bytes, experiment, options, place, index, config, num_cpus=None, serves_trials=False):
        made.append((place, index, num_cpus))
        fake_launch.serves.append(serves_trials)
        return reg.StartingHost(place, f"host{index}", None, None)

    fake_launch.serves = []  # whether each host was made to hold trials (its Ray threads)
    monkeypatch.setattr(reg, "launch_host", fake_launch)
    return made


def _cluster(monkeypatch, nodes: dict[str, dict[str, float]], gpus: dict[str, int]) -> None:
    plan = [reg.HostPlace(n, k, True) for n, g in gpus.items() for k in range(g)]
    plan += [reg.HostPlace(n, 0, False) for n, g in gpus.items() if g == 0]
    monkeypatch.setattr(reg, "plan_hosts", lambda *args: plan)
    monkeypatch.setattr(reg, "available_resources_per_node", lambda: {n: dict(r) for n, r in nodes.items()})


OPTIONS = {"host_cpus": 1, "slots_per_host": 4, "max_slots_per_host": 4}


def test_hosts_launched_together_share_their_nodes_cpus(monkeypatch, launches):
    # 4 GPUs but 2.5 free CPUs: two hosts of 1 CPU fit (and leave the trials room); the others wait.
    _cluster(monkeypatch, {"a": {"CPU": 2.5, "GPU": 4.0}}, {"a": 4})
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
    assert "the idle hosts of an earlier fit() of this driver free theirs idle_timeout_s after it" in reason


def test_a_cpu_node_without_free_cpus_still_gets_its_first_host_unreserved(monkeypatch, launches):
    _cluster(monkeypatch, {"a": {"CPU": 0.5}}, {"a": 0})
    started, reason = reg.launch_where_free(b"", "exp", OPTIONS, None, taken=set(), first=0, any_running=False)
    assert [(p.node_id, n) for p, _, n in launches] == [("a", 0)] and reason is None
    launches.clear()  # with a host running elsewhere, no unreserved one is added
    started, reason = reg.launch_where_free(b"", "exp", OPTIONS, None, taken=set(), first=1, any_running=True)
    assert started == [] and launches == [] and "no node has 1 CPU free" in reason


def test_hosts_never_take_the_cpus_the_trials_need_and_say_so_once(monkeypatch, launches, caplog):
    """num_hosts=2 with host_cpus=1 on a 2-CPU cluster: two hosts would reserve every CPU and leave each trial
    (0.01 CPU) PENDING forever. The second is not started, with one warning line naming host_cpus."""
    monkeypatch.setattr(reg, "available_resources_per_node", lambda: {"a": {"CPU": 2.0}})
    options = {**OPTIONS, "num_hosts": 2}
    with caplog.at_level("WARNING", logger=reg.logger.name):
        started, reason = reg.launch_where_free(b"", "exp-starved", options, None, taken=set(), first=0,
                                                any_running=False)
        assert [(p.index, n) for p, _, n in launches] == [(0, 1.0)] and reason is None
        launches.clear()  # asked again (a later trial), the first host holding its CPU: none, no second warning
        monkeypatch.setattr(reg, "available_resources_per_node", lambda: {"a": {"CPU": 1.0}})
        reg.launch_where_free(b"", "exp-starved", options, None, taken={reg.HostPlace(None, 0, False)}, first=1,
                              any_running=True)
    assert launches == []
    lines = [r.getMessage() for r in caplog.records if "not started" in r.getMessage()]
    assert len(lines) == 1 and "host_cpus=1" in lines[0] and "0.01 CPU each" in lines[0], lines
    # With room for the trials beside them, both start.
    launches.clear()
    monkeypatch.setattr(reg, "available_resources_per_node", lambda: {"a": {"CPU": 2.5}})
    reg.launch_where_free(b"", "exp-room", options, None, taken=set(), first=0, any_running=False)
    assert [p.index for p, _, _ in launches] == [0, 1]


def test_the_only_host_that_would_take_the_trials_cpus_starts_unreserved(monkeypatch, launches):
    monkeypatch.setattr(reg, "available_resources_per_node", lambda: {"a": {"CPU": 1.0}})
    reg.launch_where_free(b"", "exp-one", {**OPTIONS, "num_hosts": 1}, None, taken=set(), first=0, any_running=False)
    assert [(p.index, n) for p, _, n in launches] == [(0, 0.0)]


class _Context:
    def get_actor_id(self):
        return None  # the driver, not a trial

    def get_node_id(self):
        return "a"  # the driver's node


@pytest.fixture
def driver(monkeypatch, launches):
    """The trainable class's prestart as the driver runs it, with Ray's calls recorded instead of made."""
    from ray_modelbatch.tune import proxy

    calls = {"registry": [], "killed": [], "data": []}
    monkeypatch.setattr(proxy.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(proxy, "load_in_driver", lambda spec, registry: calls["data"].append(registry))
    monkeypatch.setattr(proxy.ray, "get_runtime_context", lambda: _Context())
    monkeypatch.setattr(proxy.ray, "kill", lambda handle, no_restart=True: calls["killed"].append(handle))
    monkeypatch.setattr(proxy, "trial_mode", lambda cls: "process")
    monkeypatch.setattr(proxy, "get_registry", lambda spec, exp, options, starting=None, data_pending=False:
                        calls["registry"].append((starting, data_pending)) or _Registry)
    _cluster(monkeypatch, {"a": {"CPU": 8.0, "GPU": 2.0}}, {"a": 2})
    T = type("T", (proxy.SlotTrialProxy,), {"_experiment": "exp", "_spec_bytes": b"", "_options": dict(OPTIONS)})
    return proxy, T, calls


class _Registry:
    class start_hosts:  # noqa: N801 - stands in for an actor method
        @staticmethod
        def remote(config, quiet=False):
            return None


def test_the_driver_starts_the_hosts_of_a_new_registry_and_hands_them_over(monkeypatch, driver, launches):
    proxy, T, calls = driver
    monkeypatch.setattr(proxy, "registry_exists", lambda experiment: False)
    T._prestart_hosts({"lr": 0.1})
    assert [(p.index, i) for p, i, _ in launches] == [(0, 0), (1, 1)]  # both GPUs' hosts, before the registry
    [(starting, data_pending)] = calls["registry"]
    assert [s.name for s in starting] == ["host0", "host1"] and calls["killed"] == []
    assert data_pending and calls["data"] == [_Registry]  # the driver loads the data for them meanwhile


@pytest.mark.parametrize("plan,held", [([("a", 0)], True), ([(None, 0)], True), ([("b", 0)], False),
                                       ([("a", 0), ("a", 1)], False)])
def test_the_only_host_on_the_drivers_node_holds_the_trials(monkeypatch, driver, launches, plan, held):
    """One planned host on the driver's node (or unpinned) holds the sweep's trials; a host on another node (its
    trials would write checkpoints there) or several hosts leave them to the trial server."""
    from ray_modelbatch.tune import shared_trials

    proxy, T, calls = driver
    monkeypatch.setattr(proxy, "registry_exists", lambda experiment: False)
    monkeypatch.setattr(proxy, "trial_mode", lambda cls: "shared")
    places = [reg.HostPlace(node, k, False) for node, k in plan]
    monkeypatch.setattr(proxy, "planned_hosts", lambda options: places)
    monkeypatch.setattr(reg, "planned_hosts", lambda options, spread=(): places)
    monkeypatch.setattr(reg, "available_resources_per_node", lambda: None)
    served = []
    monkeypatch.setattr(proxy, "serve_on_host", served.append)
    monkeypatch.setattr(proxy, "trial_server", lambda: served.append("server"))
    T._prestart_hosts({"lr": 0.1})
    assert reg.launch_host.serves == [held] * len(plan)  # 1,024 Ray threads where it holds them
    assert served == ([None] if held else ["server"])  # the fake launch's handle, or the trial server
    assert shared_trials._host == []  # (nothing real was registered)


def test_an_existing_registry_starts_its_own_hosts(monkeypatch, driver, launches):
    proxy, T, calls = driver
    monkeypatch.setattr(proxy, "registry_exists", lambda experiment: True)
    T._prestart_hosts({"lr": 0.1})
    assert launches == [] and calls["registry"] == [([], False)] and calls["data"] == []


def test_hosts_the_driver_made_are_killed_when_the_registry_cannot_be_made(monkeypatch, driver, launches):
    proxy, T, calls = driver
    monkeypatch.setattr(proxy, "registry_exists", lambda experiment: False)

    def fail(*args, **kwargs):
        raise RuntimeError("GCS unavailable")

    monkeypatch.setattr(proxy, "get_registry", fail)
    monkeypatch.setattr(reg, "launch_host",
                        lambda *a, **k: reg.StartingHost(a[3], f"host{a[4]}", f"handle{a[4]}", None))
    T._prestart_hosts({"lr": 0.1})  # only a head start: it logs and returns
    assert calls["killed"] == ["handle0", "handle1"]


def test_cpu_hosts_per_node_plans_that_many_hosts_on_each_cpu_node_and_none_more_on_gpus(monkeypatch):
    nodes = [{"Alive": True, "NodeID": "a", "Resources": {"CPU": 2.0}},
             {"Alive": True, "NodeID": "b", "Resources": {"CPU": 8.0}}]
    monkeypatch.setattr(reg.ray, "nodes", lambda: nodes)
    assert [(p.node_id, p.index, p.gpu) for p in reg.plan_hosts(None, 2)] == [
        ("a", 0, False), ("a", 1, False), ("b", 0, False), ("b", 1, False)]
    assert len(reg.planned_hosts({"cpu_hosts_per_node": 3})) == 6
    auto = {"cpu_hosts_per_node": "auto"}  # one per node; two on a node whose first host found kernel-bound steps
    assert [(p.node_id, p.index, p.share) for p in reg.planned_hosts(auto)] == [("a", 0, 2), ("b", 0, 2)]
    assert [(p.node_id, p.index) for p in reg.planned_hosts(auto, spread={"a"})] == [("a", 0), ("a", 1), ("b", 0)]
    nodes.append({"Alive": True, "NodeID": "g", "Resources": {"CPU": 8.0, "GPU": 2.0}})
    assert [(p.node_id, p.index, p.gpu) for p in reg.plan_hosts(None, 2)] == [("g", 0, True), ("g", 1, True)]


def test_hosts_sharing_a_cpu_node_split_its_reservation_and_cores(monkeypatch, launches):
    # A 2-CPU node whose 16 trials hold 0.16 CPU: two hosts of 1 CPU would not fit, two halves do.
    plan = [reg.HostPlace("a", 0, False, 2), reg.HostPlace("a", 1, False, 2)]
    monkeypatch.setattr(reg, "plan_hosts", lambda *args: plan)
    monkeypatch.setattr(reg, "available_resources_per_node", lambda: {"a": {"CPU": 1.84}})
    options = {**OPTIONS, "cpu_hosts_per_node": 2}
    started, reason = reg.launch_where_free(b"", "exp", options, None, taken=set(), first=0, any_running=False)
    assert [(p.index, n) for p, _, n in launches] == [(0, 0.5), (1, 0.5)] and reason is None
    assert reg.cpu_host_share(options, plan[0]) == 2 and reg.cpu_thread_share(options, plan[0]) == 2
    assert reg.cpu_host_share(options, reg.HostPlace("g", 0, True)) == 1  # a GPU host keeps its whole reservation
    # "auto" reserves the share a second host will need, but computes with all but one core until one joins
    auto = {**options, "cpu_hosts_per_node": "auto"}
    assert reg.cpu_thread_share(auto, plan[0]) == 1 and reg.cpu_thread_share(auto, plan[1]) == 2
    from ray_modelbatch.tune.host import default_threads
    assert [default_threads(2), default_threads(2, 2), default_threads(8, 2), default_threads(3, 4)] == [1, 1, 4, 1]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_cpu_hosts_per_node_must_be_a_whole_number(bad):
    from tune_helpers import make_trainable

    with pytest.raises(ValueError, match=r"cpu_hosts_per_node=.*whole number of at least 1"):
        make_trainable(cpu_hosts_per_node=bad)


def test_a_host_judges_its_steps_after_enough_of_them():
    from ray_modelbatch.tune.cpu_spread import SAMPLE_STEPS, StepCostMeter

    cnn, mlp = StepCostMeter(), StepCostMeter()
    for _ in range(SAMPLE_STEPS - 1):
        cnn.add(0.012)  # a CNN stack's fused step: 12 ms of CPU
        mlp.add(0.0015)
    assert cnn.verdict is None and mlp.verdict is None
    cnn.add(0.001)  # one cheap step does not move the median
    mlp.add(0.050)  # nor one slow one (an evaluation)
    assert cnn.verdict is True and mlp.verdict is False
    assert StepCostMeter(threshold_ms=0).verdict is None


@pytest.mark.parametrize("good", ["auto", 1, 3])
def test_cpu_hosts_per_node_takes_auto_or_a_count(good):
    from tune_helpers import make_trainable

    assert make_trainable(cpu_hosts_per_node=good)._options["cpu_hosts_per_node"] == good


def test_hosts_per_gpu_plans_that_many_hosts_on_each_gpu_each_with_its_part(monkeypatch):
    nodes = [{"Alive": True, "NodeID": "g", "Resources": {"CPU": 16.0, "GPU": 2.0}},
             {"Alive": True, "NodeID": "c", "Resources": {"CPU": 8.0}}]
    monkeypatch.setattr(reg.ray, "nodes", lambda: nodes)
    plan = reg.planned_hosts({"hosts_per_gpu": 3})
    assert [(p.node_id, p.index, p.gpu, p.share) for p in plan] == [("g", i, True, 3) for i in range(6)]
    assert [p.label for p in plan[:4]] == ["g-gpu0.0", "g-gpu0.1", "g-gpu0.2", "g-gpu1.0"]
    assert [reg.gpu_fraction(p) for p in plan[:2]] == [1 / 3, 1 / 3]
    assert reg.HostPlace("g", 1, True).label == "g-gpu1" and reg.gpu_fraction(reg.HostPlace("c", 0, False, 2)) == 0.0
    assert reg.cpu_host_share({"hosts_per_gpu": 3}, plan[0]) == 1  # its CPU reservation stays whole


def test_hosts_sharing_a_gpu_launch_together_as_far_as_its_free_part_goes(monkeypatch, launches):
    # One GPU of which another job holds 0.3: one of its two half-GPU places fits.
    plan = [reg.HostPlace("a", i, True, 2) for i in range(2)]
    monkeypatch.setattr(reg, "plan_hosts", lambda *args: plan)
    monkeypatch.setattr(reg, "available_resources_per_node", lambda: {"a": {"CPU": 8.0, "GPU": 0.7}})
    options = {**OPTIONS, "hosts_per_gpu": 2}
    started, reason = reg.launch_where_free(b"", "exp", options, None, taken=set(), first=0, any_running=False)
    assert [p.index for p, _, _ in launches] == [0] and reason is None
    launches.clear()
    monkeypatch.setattr(reg, "available_resources_per_node", lambda: {"a": {"CPU": 8.0, "GPU": 1.0}})
    reg.launch_where_free(b"", "exp", options, None, taken=set(), first=0, any_running=False)
    assert [p.index for p, _, _ in launches] == [0, 1]  # both halves of a free GPU
    launches.clear()
    monkeypatch.setattr(reg, "available_resources_per_node", lambda: {"a": {"CPU": 8.0, "GPU": 0.25}})
    started, reason = reg.launch_where_free(b"", "exp", options, None, taken=set(), first=0, any_running=True)
    assert started == [] and "no node has 1 CPU and 0.5 GPU free" in reason


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_hosts_per_gpu_must_be_a_whole_number(bad):
    from tune_helpers import make_trainable

    with pytest.raises(ValueError, match=r"hosts_per_gpu=.*whole number of at least 1"):
        make_trainable(hosts_per_gpu=bad)


@pytest.mark.parametrize("device,share,expected", [("cuda", 2, 0.4), ("cuda", 1, 0.8), ("cpu", 2, 0.8)])
def test_a_host_sharing_its_gpu_profiles_for_its_part_of_the_memory(monkeypatch, device, share, expected):
    import types

    import torch

    from ray_modelbatch import capacity
    from ray_modelbatch.slot_group import SlotGroup
    from ray_modelbatch.tune.host import SlotHost

    seen = {}
    monkeypatch.setattr(capacity, "profile_capacity", lambda build, dev, **kw: seen.update(kw) or "fit")
    monkeypatch.setattr(SlotGroup, "build_for_profile", staticmethod(lambda *a, **k: None))
    host = types.SimpleNamespace(spec=types.SimpleNamespace(model=lambda c: None, hparams=lambda c: {}), data=None,
                                 device=torch.device(device), gpu_share=share)
    assert SlotHost._profile(host, {}, 8) == "fit"
    assert seen["fraction"] == pytest.approx(expected) and seen["max_slots"] == 8


def test_the_registry_watches_closely_only_while_a_cpu_nodes_spread_is_pending():
    # cpu_hosts_per_node="auto": until the node's first host has judged its steps, and while a second host
    # starts, the registry's watch looks every SPREAD_WATCH_S instead of every second.
    r = object.__new__(reg.HostRegistry)
    cpu, gpu = reg.HostPlace("n1", 0, False), reg.HostPlace("n2", 0, True)
    r.options, r._judged, r._joining = {"cpu_hosts_per_node": "auto"}, set(), []
    r.hosts = {cpu: ("host0", None), gpu: ("host1", None)}  # place -> (name, handle)
    assert r._spread_pending()  # n1's host has not judged its steps yet
    r._judged.add("n1")
    assert not r._spread_pending()  # judged; a GPU host never spreads
    r._joining = [object()]
    assert r._spread_pending()  # a second host is starting
    r.options = {"cpu_hosts_per_node": 2}
    assert not r._spread_pending()  # a fixed count: nothing to judge
