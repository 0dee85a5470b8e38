#!/usr/bin/env bash
# Wheels that let benchmarks/gpu_run.sh run the Tune sweep on a GPU machine that has torch but no Ray and
# no internet: run this where pip can download, then copy the folder (or carry it) to the GPU machine.
#
#   bash benchmarks/gpu_wheels.sh [DIR] [PYTHON_VERSION]      # default .whl and 3.12
#
# It fetches Ray (the version installed here, so both machines run the same Ray) and what ray[tune] needs
# beyond a typical CUDA PyTorch image (jsonschema and its parts, pydantic and its parts, a typing-extensions
# as new as pydantic needs, tensorboardX), without their dependencies, into DIR, and strips Ray's wheel of
# its Java jar and dashboard client (benchmarks/strip_ray_wheel.py): about 48 MB in all, one 64 MiB transfer.
set -euo pipefail
dir=${1:-.whl}
pyver=${2:-3.12}
ray_version=$(python3 -c "import ray; print(ray.__version__)")
mkdir -p "$dir"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir" "ray==$ray_version" jsonschema jsonschema-specifications referencing rpds-py \
    pydantic pydantic-core annotated-types typing-inspection typing-extensions tensorboardX
python3 "$(dirname "$0")/strip_ray_wheel.py" "$dir"/ray-*.whl
du -sh "$dir"
