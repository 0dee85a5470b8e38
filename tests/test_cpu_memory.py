"""How a slot host keeps its engine thread's big tensors mapped: huge pages where the node has them, else one arena.

The registry starts a host with ``MALLOC_ARENA_MAX=1`` in its ``runtime_env``
only where huge pages are missing, because that ``runtime_env`` makes Ray start
a fresh process instead of taking an idle worker (see
``ray_modelbatch.cpu_memory.allocator_env``). These tests pin that choice, and
check in a fresh process that the huge pages really stop a non-main thread's
big tensors from faulting in again on every step.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from ray_modelbatch import cpu_memory


def _mode_file(tmp_path, text: str) -> str:
    path = tmp_path / "enabled"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("mode, usable", [
    ("[always] madvise never\n", True),
    ("always [madvise] never\n", True),
    ("always madvise [never]\n", False),
])
def test_huge_pages_usable_reads_the_kernel_mode(tmp_path, mode, usable):
    assert cpu_memory.huge_pages_usable(_mode_file(tmp_path, mode)) is usable


def test_huge_pages_unusable_without_the_mode_file(tmp_path):
    assert cpu_memory.huge_pages_usable(str(tmp_path / "missing")) is False


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("MALLOC_ARENA_MAX", "THP_MEM_ALLOC_ENABLE", "RAY_MODELBATCH_KEEP_FREED_MEMORY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_host_env_is_empty_where_huge_pages_do_the_job(clean_env):
    clean_env.setattr(cpu_memory, "huge_pages_usable", lambda *a: True)
    assert cpu_memory.allocator_env() == {}  # no runtime_env: Ray may give the host an idle worker


def test_host_env_limits_arenas_without_huge_pages(clean_env):
    clean_env.setattr(cpu_memory, "huge_pages_usable", lambda *a: False)
    assert cpu_memory.allocator_env() == {"MALLOC_ARENA_MAX": "1"}


def test_host_env_passes_on_the_users_arena_setting(clean_env):
    clean_env.setattr(cpu_memory, "huge_pages_usable", lambda *a: True)
    clean_env.setenv("MALLOC_ARENA_MAX", "4")
    assert cpu_memory.allocator_env() == {"MALLOC_ARENA_MAX": "4"}


def test_opting_out_sets_nothing(clean_env):
    clean_env.setattr(cpu_memory, "huge_pages_usable", lambda *a: False)
    clean_env.setenv("RAY_MODELBATCH_KEEP_FREED_MEMORY", "0")
    assert cpu_memory.allocator_env() == {}
    assert cpu_memory.use_huge_pages() is False
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    assert cpu_memory.big_tensor_policy() == "off"


def test_use_huge_pages_keeps_the_users_choice(clean_env):
    clean_env.setattr(cpu_memory, "huge_pages_usable", lambda *a: True)
    clean_env.setenv("THP_MEM_ALLOC_ENABLE", "0")
    assert cpu_memory.use_huge_pages() is False
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


def test_use_huge_pages_after_torch_is_imported_changes_nothing(clean_env):
    import torch  # noqa: F401 - torch has read its environment: setting the variable now would be a lie

    clean_env.setattr(cpu_memory, "huge_pages_usable", lambda *a: True)
    assert cpu_memory.use_huge_pages() is False
    assert "THP_MEM_ALLOC_ENABLE" not in os.environ
    assert cpu_memory.big_tensor_policy().startswith("none")


# A fresh process: a thread started after 20 others took malloc arenas (as Ray's threads have in a worker)
# allocates and touches a 96 MB tensor a few times, as a fused step's activation; prints the minor page faults
# of the last allocation. Without huge pages (or one arena) glibc maps such a block fresh each time.
_FAULTS = textwrap.dedent("""
    import resource, sys, threading
    from ray_modelbatch.cpu_memory import keep_freed_memory, use_huge_pages
    print("huge" if use_huge_pages() else "none")
    import torch
    keep_freed_memory()
    hold = threading.Event()
    others = [threading.Thread(target=lambda: (bytearray(1000), hold.wait()), daemon=True) for _ in range(20)]
    for t in others:
        t.start()
    def step():
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            x = torch.empty(24 << 20)  # 96 MB of fp32
            x.fill_(1.0)
            del x
            faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
        print(faults)
    t = threading.Thread(target=step)
    t.start()
    t.join()
    hold.set()
""")


def _faults(env: dict[str, str]) -> tuple[str, int]:
    full = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "THP_MEM_ALLOC_ENABLE")} | env
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=full, capture_output=True, text=True, check=True)
    policy, faults = out.stdout.split()
    return policy, int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not cpu_memory.huge_pages_usable(),
                    reason="needs Linux with transparent huge pages (always or madvise)")
def test_a_threads_big_tensor_stops_faulting_with_huge_pages():
    policy, faults = _faults({"THP_MEM_ALLOC_ENABLE": "0"})  # the user's opt-out of torch's huge pages
    assert policy == "none" and faults > 10_000, faults  # 96 MB in 4 KB pages: ~24,600 faults, every time
    policy, faults = _faults({})
    assert policy == "huge" and faults < 1_000, faults  # one fault per 2 MB page: ~48


@pytest.mark.slow  # a process per allocator policy: 12 s on a 2-core AMD EPYC; run by .ci/run
def test_thread_memory_benchmark_runs_every_policy():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "thread_memory.py"), "--model", "mlp_tiny",
                          "--slots", "2", "--steps", "1", "--rounds", "1", "--threads", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| policy")]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == ["default", "MALLOC_ARENA_MAX=1", "huge pages", "both"]
    in_effect = [r.rstrip(" |").rsplit(" | ", 1)[1] for r in rows[1:]]
    usable = str(cpu_memory.huge_pages_usable())
    assert in_effect == ["False", "False", usable, usable]
