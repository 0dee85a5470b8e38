"""torch's vector math (MKL's VML on CPU) started on one thread, before any parallel call of it.

Why: on this build, torch takes ``sqrt``, ``exp`` and other elementwise
functions of fp32 CPU tensors from MKL's vector math library. When a fresh
process's first such call is split over OpenMP threads, the part a worker
thread computes sometimes comes out about 2**-14 off (relative error 7e-5; not
one last bit): a ``[20000]`` fp32 ``sqrt`` on 2 threads did so in 8 of 31
fresh processes (the worker's whole half, 9,996 values), and every later call
was exact. It looks like a race in the library's start: one call on one thread
first (8 values, too few to be split) prevented it in all 49 processes tried
(``benchmarks/RESULTS.md``, session 42). Left alone, a fused step's first
optimizer update (Adam's ``sqrt`` of its second moments) could differ from the
model's own, and two runs that must agree bit for bit (run-ahead and rollback)
could disagree.
"""

from __future__ import annotations

import torch

_started = False


def start() -> None:
    """Make torch's first vector-math call here, on the calling thread (once per process)."""
    global _started
    if not _started:
        _started = True
        torch.ones(8).sqrt()
