"""How many slot hosts a CPU node runs: one, or a second one once the first shows its steps are kernel-bound.

A CPU host computes with one thread on a 2-core node (see
:func:`~ray_modelbatch.tune.host.default_threads`): two OpenMP threads stall
at every op's barrier whenever Tune's driver holds the other core. For a tiny
MLP that is right, since its fused step is mostly Python and dispatch, which a
second host process would only repeat while the driver needs the CPU. For a
CNN it leaves a core idle: its step is mostly convolution kernels, which two
processes, each stepping its own stacks with one thread, run side by side
without any barrier between them. Measured on 2 cores
(``benchmarks/tune_sweep.py --cpu-hosts-per-node {1,2}``, six runs each,
alternating): the digits CNN sweep took a median 26.1 s with two hosts against
33.2 s with one; the MLP sweep 9.8-10.2 s against 8.3 s.

``batched_trainable(cpu_hosts_per_node="auto")`` (the default) therefore
starts one host per CPU node and lets it measure its own steps: the median
CPU time of its first :data:`SAMPLE_STEPS` fused steps. At
:data:`KERNEL_BOUND_STEP_MS` or more (measured in the sweeps on 2 cores: the CNN
sweep's hosts 6-34 ms, the MLP sweep's 2.0-2.9 ms) the registry plans
:data:`AUTO_CPU_HOSTS` hosts on that node, starts the next one without
waiting for it, and later trials go to the host with the most free slots,
i.e. the new one, until the two hold as many.

Trials usually come together at a sweep's start, before the first host has
stepped 30 times. Had they all attached to it, the second host would have had
nothing to do until trials ended (Tune's CIFAR tutorial sweep, 20 trials
ported, on 2 cores: the second host stepped 0 times, 39-55 s against 26.5 s
with two hosts from the start). So until the decision, and until the second
host is up, the first one takes :data:`JUDGING_TRIALS` trials and the others
wait, at most :data:`HOLD_BACK_S` seconds. Every host on such a node
reserves its share of ``host_cpus`` from the start, so that the second one
fits beside the trials' own reservations, and takes its share of the cores
once the node spreads.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

AUTO_CPU_HOSTS = 2  # hosts of a CPU node whose first host's steps are kernel-bound
# Trials a node's first host takes until the node's spread is decided (registry._holds_back): enough that its
# stacks look like a sweep's, since its verdict judges them. With 4, the digits CNN sweep's first host measured
# 4.6 ms per fused step in one run (under the threshold: one host did all the work, 26.5 s against 20.2-20.7)
# and 6.2 ms in another; the second host, with more trials, 17.7 ms.
JUDGING_TRIALS = 8
HOLD_BACK_S = 10.0  # the longest other trials wait for that decision and the second host's start
KERNEL_BOUND_STEP_MS = 5.0  # median CPU time of a fused step at or above which a step counts as kernel-bound
SAMPLE_STEPS = 30  # fused steps a host measures before it says


def check_cpu_hosts_per_node(value: Any) -> int | str:
    """``"auto"`` or an int of at least 1, else one line naming the argument and what it takes."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"batched_trainable(cpu_hosts_per_node={value!r}): give 'auto' or a whole number of at "
                         "least 1")
    return value


def hosts_on_cpu_node(setting: int | str, node_cpus: float, spread: bool) -> int:
    """Hosts the plan puts on a CPU node of ``node_cpus`` CPUs: the setting, or for ``"auto"`` one until the
    node ``spread`` (then :data:`AUTO_CPU_HOSTS`, at most one per CPU)."""
    if setting != "auto":
        return int(setting)
    return max(1, min(AUTO_CPU_HOSTS, int(node_cpus))) if spread else 1


def reservation_share(setting: int | str, node_cpus: float) -> int:
    """Into how many parts a CPU host splits ``host_cpus``: the hosts its node may run."""
    return hosts_on_cpu_node(setting, node_cpus, spread=True)


class StepCostMeter:
    """A host's verdict on its own fused steps: None until :data:`SAMPLE_STEPS` were measured, then whether
    their median CPU time reached :data:`KERNEL_BOUND_STEP_MS` (``threshold_ms`` overrides it, for tests)."""

    def __init__(self, threshold_ms: float | None = None):
        self.threshold_ms = KERNEL_BOUND_STEP_MS if threshold_ms is None else float(threshold_ms)
        self.samples: list[float] = []
        self.verdict: bool | None = None
        self.median_ms: float | None = None
        self.verdict_at: float | None = None  # time.time() of the verdict: a milestone of the host's start

    def add(self, cpu_s: float) -> None:
        """One fused step's CPU time (seconds)."""
        if self.verdict is not None:
            return
        self.samples.append(cpu_s * 1e3)
        if len(self.samples) >= SAMPLE_STEPS:
            self.median_ms = statistics.median(self.samples)
            self.verdict = self.median_ms >= self.threshold_ms
            self.verdict_at = time.time()
            self.samples = []
