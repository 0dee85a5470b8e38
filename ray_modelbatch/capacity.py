"""How many slots of a model fit on a device: profile two slot counts and fit a line (as Hydro does).

A fused stack's memory grows linearly in its slot count S: each slot adds its
parameters, gradients, optimizer state, data stream and activations, while the
rest (allocator and library workspaces, caches, the first-call checks) is
fixed. The peak of one real step at two slot counts gives that line, and the
line gives the largest S within a memory budget, without trying S after S.

Fitting is not the same as paying, though: on a CPU a stack of conv nets gets
slower per slot once its activations no longer stay in cache (session 20,
``benchmarks/RESULTS.md``: a GroupNorm CNN trained 132 / 126 / 100
model-steps/s at 8 / 32 / 128 slots, below a loop of the same models at 128),
while small MLPs keep gaining (8,698 / 19,027 / 25,833). So
:func:`cap_by_throughput` times a step at a few slot counts up to what memory
allows and keeps the largest whose throughput is near the best, within a time
budget: on a CPU the larger points are the slow ones, and the host's first
trial waits for the profile.

Pure torch: the slot host calls this before it opens its stacks.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence, TypeVar

import torch

from .cpu_memory import keep_freed_memory, release_freed_memory
from .errors import MemoryProfileError, OutOfDeviceMemoryError, is_out_of_memory

MiB = 2**20

Build = Callable[[int], Callable[[], None]]
T = TypeVar("T")


@dataclass(frozen=True)
class CapacityFit:
    """The memory line ``fixed_bytes + per_slot_bytes * S`` and the slot count it allows."""

    per_slot_bytes: int
    fixed_bytes: int
    budget_bytes: int
    slots: int
    # With a throughput check (see cap_by_throughput): the slots memory allowed, and (slots, model-steps/s)
    # of each stack timed.
    memory_slots: int | None = None
    throughput: tuple[tuple[int, float], ...] = ()
    throughput_stop: str = ""  # why larger stacks were not timed (cap_by_throughput's time budget)

    def describe(self) -> str:
        text = (
            f"{self.slots} slots: {self.per_slot_bytes / MiB:.1f} MiB per slot + {self.fixed_bytes / MiB:.1f} MiB "
            f"fixed, within a budget of {self.budget_bytes / MiB:.1f} MiB"
        )
        if self.throughput:
            rates = ", ".join(f"{s}: {r:,.0f}" for s, r in self.throughput)
            text += f"; memory allows {self.memory_slots}, model-steps/s by slots {rates}"
            if self.throughput_stop:
                text += f"; {self.throughput_stop}"
        return text


# Slot counts whose fused-step throughput cap_by_throughput compares (up to what memory allows), and the
# fraction of the best throughput a larger stack may fall to and still be taken: more slots train more
# trials at once, so nearly the same total rate is worth it.
THROUGHPUT_POINTS = (8, 32, 128, 512)
THROUGHPUT_SLACK = 0.9
# The most seconds cap_by_throughput spends timing stacks: it skips a larger point whose predicted time would go
# over. A host profiles before it takes its first trial, and on a CPU the larger points cost the most: Tune's
# CIFAR tutorial CNN (batch 16, one thread) took 93 s to profile up to 256 slots, against a host start timeout of
# 120 s; within this budget it times 8 and 32 slots (3 s) and takes 32, its best rate.
THROUGHPUT_BUDGET_S = 5.0
# The part of a device's free memory a host's profile plans for; the rest absorbs the allocator's caching
# and fragmentation. Hosts that share a GPU (``hosts_per_gpu``) each plan for their part of it.
MEMORY_FRACTION = 0.8


# ---------------------------------------------------------------- reading memory
def _no_profile(why: str) -> MemoryProfileError:
    return MemoryProfileError(
        f"cannot measure this process's memory ({why}), so the slots per host cannot be profiled. "
        "Fix: pass an explicit slots_per_host."
    )


def _proc_kib(path: str, field: str) -> int:
    """A ``Field:  123 kB`` line of a /proc file, in bytes."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError) as exc:
        raise _no_profile(f"reading {field} from {path} failed: {exc}") from exc
    raise _no_profile(f"{path} has no {field}")


def _reset_peak_rss() -> None:
    """Make VmHWM (peak RSS) start again from the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        raise _no_profile(f"resetting the peak RSS through /proc/self/clear_refs failed: {exc}") from exc


def _check_device(device: torch.device) -> None:
    if device.type not in ("cuda", "cpu"):
        raise _no_profile(f"device type {device.type!r} is not supported; only cuda and cpu are")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    else:
        release_freed_memory()


def memory_in_use(device: torch.device | str) -> int:
    """Bytes this process holds now, after freeing what it can: the baseline points are measured from.

    CUDA: bytes allocated by torch on the device. CPU: the process's RSS.
    """
    device = torch.device(device)
    _check_device(device)
    _free(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    keep_freed_memory()  # the policy the fused steps run under, from the first point on
    return _proc_kib("/proc/self/status", "VmRSS")


def measure_step_memory(build: Build, slots: int, device: torch.device | str, *, baseline: int | None = None) -> int:
    """Peak bytes of building ``slots`` slots and running the step ``build(slots)`` returns.

    Building (ModelBatch, optimizer, streams) and running are both inside the
    measured region. On CPU, freed memory stays in the process (see
    :mod:`ray_modelbatch.cpu_memory`) and one-time costs of the first step stay
    allocated, so measure several points in increasing ``slots`` and pass the
    ``baseline`` (:func:`memory_in_use`) taken before the first; by default the
    baseline is taken now.
    """
    device = torch.device(device)
    _check_device(device)
    base = memory_in_use(device) if baseline is None else int(baseline)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        build(slots)()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        _free(device)
        _reset_peak_rss()
        build(slots)()
        peak = _proc_kib("/proc/self/status", "VmHWM")
    _free(device)
    return max(0, peak - base)


def device_memory_budget(device: torch.device | str, fraction: float = MEMORY_FRACTION) -> int:
    """``fraction`` of the memory still available on ``device``, in bytes.

    CUDA: free device memory (plus what torch has cached but not allocated,
    which this process can reuse). CPU: ``MemAvailable`` of /proc/meminfo. The
    rest of the memory (``1 - fraction``) absorbs fragmentation and what the
    profile does not see.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    device = torch.device(device)
    _check_device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = _proc_kib("/proc/meminfo", "MemAvailable")
    return int(free * fraction)


# ------------------------------------------------------------------- the line
def fit_capacity(
    points: Sequence[tuple[int, int]],
    budget_bytes: int,
    max_slots: int,
    *,
    device: torch.device | str | None = None,
) -> CapacityFit:
    """Fit ``bytes = fixed + per_slot * S`` to ``(S, bytes)`` points; the most slots within ``budget_bytes``.

    Least squares over the points (two is the usual case). The slope is at
    least 1 byte and the intercept at least 0: a smaller value is measurement
    noise, and rounding that way would promise slots that do not fit. With a
    single slot count there is no slope to fit, so all memory counts per slot
    (conservative). ``device`` only names the device in the error.

    Raises:
        OutOfDeviceMemoryError: not even one slot fits in ``budget_bytes``.
    """
    if max_slots < 1:
        raise ValueError(f"max_slots must be >= 1, got {max_slots}")
    pts = [(int(s), int(m)) for s, m in points]
    if not pts or any(s < 1 for s, _ in pts):
        raise ValueError(f"need at least one point with slots >= 1, got {pts}")
    n = len(pts)
    mean_s = sum(s for s, _ in pts) / n
    mean_m = sum(m for _, m in pts) / n
    var = sum((s - mean_s) ** 2 for s, _ in pts)
    if var > 0:
        slope = max(1.0, sum((s - mean_s) * (m - mean_m) for s, m in pts) / var)
        per_slot = math.ceil(slope)
        fixed = max(0, math.ceil(mean_m - slope * mean_s))
    else:
        per_slot, fixed = max(1, math.ceil(mean_m / mean_s)), 0
    slots = (int(budget_bytes) - fixed) // per_slot
    if slots < 1:
        where = "the device" if device is None else str(device)
        raise OutOfDeviceMemoryError(
            f"not even one slot fits: one slot of this model needs about {(fixed + per_slot) / MiB:.1f} MiB "
            f"({per_slot / MiB:.1f} MiB per slot + {fixed / MiB:.1f} MiB fixed), but only "
            f"{max(0, int(budget_bytes)) / MiB:.1f} MiB are available on {where}. Fix: a smaller batch_size or "
            "a smaller model, or a device with more memory."
        )
    return CapacityFit(per_slot, fixed, int(budget_bytes), min(slots, int(max_slots)))


def _unless_out_of_memory(fn: Callable[[], T], device: torch.device) -> T | None:
    """``fn()``, or None if it ran out of device memory (other errors propagate)."""
    try:
        return fn()
    except BaseException as exc:
        if not is_out_of_memory(exc):
            raise
    _free(device)  # after the except block, which held the failed step's tensors through the traceback
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TIMED_STEPS = 3  # steps step_throughput times at each point (after one untimed step)


def step_throughput(build: Build, slots: int, device: torch.device | str, *, steps: int = TIMED_STEPS) -> float:
    """Model-steps per second of a stack of ``slots``: ``slots`` over the fastest of ``steps`` timed steps,
    after one untimed step (first-call costs)."""
    device = torch.device(device)
    step = build(slots)
    step()
    _sync(device)
    best = math.inf
    for _ in range(max(1, steps)):
        t0 = time.perf_counter()
        step()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    del step
    _free(device)
    return slots / best


def cap_by_throughput(
    build: Build,
    device: torch.device | str,
    memory_slots: int,
    *,
    points: Sequence[int] = THROUGHPUT_POINTS,
    slack: float = THROUGHPUT_SLACK,
    budget_s: float | None = THROUGHPUT_BUDGET_S,
) -> tuple[int, tuple[tuple[int, float], ...], str]:
    """The largest slot count, up to ``memory_slots``, whose step throughput is within ``slack`` of the best.

    Times :func:`step_throughput` at each of ``points`` below ``memory_slots``
    and at ``memory_slots`` itself, smallest first, and stops at the first
    that falls below ``slack`` of the best so far (a larger stack only streams
    more memory), runs out of memory, or would take the timing past
    ``budget_s`` seconds (predicted from the last point's rate: its steps take
    ``slots / rate`` each). Returns the slot count, the ``(slots,
    model-steps/s)`` measured, and why it stopped short of the points left
    ("" where it did not).
    """
    if not 0.0 < slack <= 1.0:
        raise ValueError(f"slack must be in (0, 1], got {slack}")
    device = torch.device(device)
    rates: list[tuple[int, float]] = []
    stopped, spent = "", 0.0
    for s in sorted({int(p) for p in points if 0 < p < memory_slots} | {int(memory_slots)}):
        if rates and budget_s is not None:
            predicted = (TIMED_STEPS + 1) * s / rates[-1][1]  # the untimed first step and the timed ones
            if spent + predicted > budget_s:
                stopped = (f"{s} slots not timed: about {predicted:.1f} s more, over the profile's {budget_s:g} s "
                           "budget (pass slots_per_host to choose)")
                break
        t0 = time.perf_counter()
        rate = _unless_out_of_memory(lambda: step_throughput(build, s, device, steps=TIMED_STEPS), device)
        spent += time.perf_counter() - t0
        if rate is None:
            break
        rates.append((s, rate))
        if rate < slack * max(r for _, r in rates):
            break
    if not rates:
        raise OutOfDeviceMemoryError(
            f"{min(int(memory_slots), min(points))} slots ran out of memory on {device} while timing them, "
            "although the memory profile allowed them. Fix: pass an explicit slots_per_host."
        )
    best = max(r for _, r in rates)
    return max(s for s, r in rates if r >= slack * best), tuple(rates), stopped


def profile_capacity(
    build: Build,
    device: torch.device | str,
    *,
    points: Sequence[int] = (2, 8),
    fraction: float = MEMORY_FRACTION,
    max_slots: int = 1024,
    throughput_points: Sequence[int] | None = None,
) -> CapacityFit:
    """How many slots fit on ``device``: measure ``build`` at ``points`` slot counts and fit a line.

    ``build(S)`` constructs S slots (e.g. :meth:`Stack.build_for_profile
    <ray_modelbatch.slot_group.SlotGroup.build_for_profile>`) and returns a
    function running one step. If a point runs out of memory, the slot count
    is capped below it and the points measured before it are fitted. With
    ``throughput_points`` (e.g. :data:`THROUGHPUT_POINTS`) the slots that fit
    are then capped where a larger stack stops paying (:func:`cap_by_throughput`).
    """
    device = torch.device(device)
    sizes = sorted({int(p) for p in points})
    if len(sizes) < 2 or sizes[0] < 1:
        raise ValueError(f"points must hold at least two distinct slot counts >= 1, got {list(points)}")
    # Before profiling: on CPU the process keeps the memory the profile frees, and may reuse it.
    budget = device_memory_budget(device, fraction)
    base = memory_in_use(device)
    measured: list[tuple[int, int]] = []
    ceiling = int(max_slots)
    for s in sizes:
        peak = _unless_out_of_memory(lambda: measure_step_memory(build, s, device, baseline=base), device)
        if peak is None:
            ceiling = min(ceiling, s - 1)
            break
        measured.append((s, peak))
    if not measured:
        raise OutOfDeviceMemoryError(
            f"{sizes[0]} slots of this model ran out of memory on {device} while profiling (budget "
            f"{budget / MiB:.1f} MiB). Fix: a smaller batch_size or a smaller model, a device with more memory, "
            "or profile with points=(1, 2) if one slot may still fit."
        )
    fit = fit_capacity(measured, budget, ceiling, device=device)
    if not throughput_points:
        return fit
    slots, rates, stopped = cap_by_throughput(build, device, fit.slots, points=throughput_points)
    return replace(fit, slots=slots, memory_slots=fit.slots, throughput=rates, throughput_stop=stopped)
