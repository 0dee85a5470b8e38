"""Rewrite a Ray wheel without the parts a Python sweep never loads, so it travels in one small transfer.

Ray's wheel is about 79 MB; 32 MB of it is the Java jar (Java workers) and 2.5 MB the dashboard's web
client (the benchmarks start Ray with ``include_dashboard=False``). Without them it is about 44 MB, and
``benchmarks/gpu_wheels.sh``'s folder fits a 64 MiB transfer to a GPU machine that has no Ray.

    python benchmarks/strip_ray_wheel.py .whl/ray-*.whl
"""
import os
import sys
import zipfile

DROP = ("ray/jars/", "ray/dashboard/client/build/")


def strip(path: str) -> None:
    """Rewrite ``path`` in place without the ``DROP`` folders, and without their lines in RECORD."""
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".tmp", "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():  # each entry keeps its ZipInfo, so the executables keep their mode bits
            if info.filename.startswith(DROP):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):  # pip's list of what it installs
                data = b"".join(line for line in data.splitlines(True)
                                if not line.decode().startswith(DROP))
            out.writestr(info, data)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    for wheel in sys.argv[1:]:
        strip(wheel)
        print(f"{wheel}: {os.path.getsize(wheel) / 1e6:.1f} MB")
