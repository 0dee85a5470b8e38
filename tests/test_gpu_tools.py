"""The GPU run's tools, on a machine without one: the stripped Ray wheel (benchmarks/strip_ray_wheel.py) loses
only what a sweep never loads, and benchmarks/gpu_probe.py runs (its GPU parts need a GPU)."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_probe  # noqa: E402
from strip_ray_wheel import strip  # noqa: E402


def test_strip_drops_the_jar_and_dashboard_client_keeps_the_rest_with_their_modes(tmp_path):
    wheel = tmp_path / "ray-0-py3-none-any.whl"
    files = {"ray/__init__.py": b"x = 1\n", "ray/core/raylet": b"\x7fELF", "ray/jars/ray_dist.jar": b"J" * 100,
             "ray/dashboard/client/build/index.html": b"<html>", "ray/dashboard/agent.py": b"y = 2\n"}
    record = "".join(f"{name},sha256=x,1\n" for name in files) + "ray-0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if name == "ray/core/raylet" else 0o644) << 16
            z.writestr(info, data)
        z.writestr("ray-0.dist-info/RECORD", record)
    strip(str(wheel))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert names == {"ray/__init__.py", "ray/core/raylet", "ray/dashboard/agent.py", "ray-0.dist-info/RECORD"}
        assert z.getinfo("ray/core/raylet").external_attr >> 16 == 0o755  # the binaries stay executable
        assert z.read("ray/__init__.py") == b"x = 1\n"
        assert z.read("ray-0.dist-info/RECORD").decode().splitlines() == [
            "ray/__init__.py,sha256=x,1", "ray/core/raylet,sha256=x,1", "ray/dashboard/agent.py,sha256=x,1",
            "ray-0.dist-info/RECORD,,"]


def test_gpu_probe_times_the_eager_step_and_says_what_needs_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(gpu_probe.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_probe.py", "--slots", "2", "--hidden", "8", "--steps", "2"])
    gpu_probe.main()
    out = capsys.readouterr().out
    assert "2 MLPs 64-8-10" in out and "- eager fused step:" in out and "need a GPU" in out
