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


def _opted_out() -> bool:
    """Not Linux (no glibc to tune), or the user set ``RAY_MODELBATCH_KEEP_FREED_MEMORY=0``."""
    return not sys.platform.startswith("linux") or os.environ.get("RAY_MODELBATCH_KEEP_FREED_MEMORY", "1") == "0"


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Raise glibc's mmap/trim thresholds once per process; returns whether they are in effect."""
    global _done
    if _done:
        return True
    if _opted_out():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        )
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        _done = False
    return _done


THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_usable(mode_file: str = THP_MODE_FILE) -> bool:
    """Whether this node's kernel backs memory with transparent huge pages where a process asks for them.

    True for the modes ``always`` and ``madvise`` (most distributions' default);
    False for ``never``, or where the file is missing (not Linux, or a kernel
    without THP).
    """
    try:
        with open(mode_file) as f:
            mode = f.read()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def allocator_env() -> dict[str, str]:
    """Environment variables the registry must start a slot host's process with, for its fused steps' big tensors.

    The host's fused steps run off its main thread (the engine thread), and
    glibc gives each new thread its own malloc arena, whose heaps are at most
    64 MB: a larger block is mapped fresh from the OS and unmapped when freed,
    whatever :func:`keep_freed_memory` set, so a thread's fused step faults its
    big tensors in again page by page every step. Measured (the 28x28 CNN of
    ``benchmarks/fused_step.py`` at 32 slots, activations ~100 MB, 2 threads,
    on a thread after 20 others took arenas, as Ray's threads do): 250-255 ms
    per step and 31,000-37,000 page faults, against 204-209 ms and none with
    ``MALLOC_ARENA_MAX=1`` (every thread uses the main arena), and 199-203 ms and
    54 faults with torch's huge pages (``THP_MEM_ALLOC_ENABLE=1``, see
    :func:`use_huge_pages`): each 2 MB page faults once.

    glibc reads ``MALLOC_ARENA_MAX`` only when a process starts, so it has to
    come in the host's ``runtime_env``, and then Ray starts a new process for
    the host instead of taking one of its idle workers: the host's constructor
    began 1.3-1.4 s after ``fit()`` against 0.7 s (2-core node, the MLP sweep).
    torch reads ``THP_MEM_ALLOC_ENABLE`` when it is first imported, which the
    host's own constructor can set. So this is empty where the node has huge
    pages, and ``MALLOC_ARENA_MAX=1`` elsewhere. A user's own
    ``MALLOC_ARENA_MAX`` is passed on; ``RAY_MODELBATCH_KEEP_FREED_MEMORY=0``
    opts out of both.
    """
    if _opted_out():
        return {}
    if "MALLOC_ARENA_MAX" in os.environ:
        return {"MALLOC_ARENA_MAX": os.environ["MALLOC_ARENA_MAX"]}
    return {} if huge_pages_usable() else {"MALLOC_ARENA_MAX": "1"}


def use_huge_pages() -> bool:
    """Have torch put its CPU tensors of 2 MB or more on huge pages; call before torch is first imported.

    For a process whose fused steps run off its main thread (see
    :func:`allocator_env`). Returns whether torch runs with the setting: False
    where the node has no huge pages, where the user opted out, or where torch
    was imported before the call (it read its environment then). A user's own
    ``THP_MEM_ALLOC_ENABLE`` is kept.
    """
    if _opted_out() or not huge_pages_usable():
        return False
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"


def big_tensor_policy() -> str:
    """How this process keeps a non-main thread's big tensors (for a host's stats): see :func:`allocator_env`."""
    if _opted_out():
        return "off"
    if os.environ.get("MALLOC_ARENA_MAX") == "1":
        return "one malloc arena"
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "1" and huge_pages_usable():
        return "huge pages"
    return "none: tensors over 64 MB fault in every step (set MALLOC_ARENA_MAX=1 in the node's environment)"


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
