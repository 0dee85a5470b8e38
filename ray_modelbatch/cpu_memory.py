"""Keep freed CPU memory in the process, so fused steps do not page-fault their tensors back in.

glibc hands every freed block above its mmap threshold (128 KB, growing to at
most 32 MB) back to the OS, and the next allocation faults it in again page by
page. One model's tensors are small and stay below the threshold, but a fused
step over S models allocates gradients and activations of tens to hundreds of
MB each step: on a measured 2-core VM, allocating and touching 103 MB took
60-117 ms, against 3 ms once freed blocks were kept. Raising glibc's mmap and
trim thresholds keeps those blocks for reuse (the usual alternative is running
under jemalloc or tcmalloc). Set ``RAY_MODELBATCH_KEEP_FREED_MEMORY=0`` to opt out.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Raise glibc's mmap/trim thresholds once per process; returns whether they are in effect."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("RAY_MODELBATCH_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        )
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        _done = False
    return _done


def allocator_env() -> dict[str, str]:
    """Environment for a process whose fused steps run off its main thread (the slot host's engine thread).

    glibc gives each new thread its own malloc arena, and such an arena's heap
    is at most 64 MB: a larger block is mapped fresh from the OS and unmapped
    when freed, whatever :func:`keep_freed_memory` set, so a thread's fused step
    faults its big tensors back in page by page every step. Measured here (the
    28x28 CNN of ``benchmarks/fused_step.py`` at 32 slots, a step's activations
    ~100 MB, 2 threads): 218-267 ms per step on a second thread against 134-165 ms
    with ``MALLOC_ARENA_MAX=1``, which makes every thread use the main arena (and
    142 ms on the main thread). glibc reads it when the process starts, so the
    registry passes it in the host's ``runtime_env``. A user's own value is kept;
    ``RAY_MODELBATCH_KEEP_FREED_MEMORY=0`` opts out.
    """
    if not sys.platform.startswith("linux") or os.environ.get("RAY_MODELBATCH_KEEP_FREED_MEMORY", "1") == "0":
        return {}
    return {"MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "1")}


def release_freed_memory() -> bool:
    """Hand the heap's free blocks back to the OS now (glibc ``malloc_trim(0)``); returns whether it ran.

    Memory profiling needs this: blocks kept by :func:`keep_freed_memory` stay in
    the process's RSS, so an allocation that reuses them would not show in the
    peak RSS of the step being measured.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        return False
    return True
