#!/usr/bin/env bash
# Wheels that let benchmarks/gpu_run.sh run the Tune sweep on a GPU machine that has torch but no Ray and
# no internet: run this where pip can download, then copy the folder (or carry it) to the GPU machine.
#
#   bash benchmarks/gpu_wheels.sh [DIR] [PYTHON_VERSION]      # default .whl and 3.12
#
# It fetches Ray (the version installed here, so both machines run the same Ray) and what ray[tune] needs
# beyond a typical CUDA PyTorch image (jsonschema and its parts, pydantic and its parts, a typing-extensions
# as new as pydantic needs, tensorboardX), without their dependencies, into two folders of at most about
# 45 MB each, for transfers with a size limit: DIR/a holds the first 40 MB of Ray's wheel (about 79 MB),
# DIR/b the rest of it and the other wheels. gpu_run.sh joins the pieces again.
set -euo pipefail
dir=${1:-.whl}
pyver=${2:-3.12}
ray_version=$(python3 -c "import ray; print(ray.__version__)")
mkdir -p "$dir/a" "$dir/b"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$dir/b" "ray==$ray_version" jsonschema jsonschema-specifications referencing rpds-py \
    pydantic pydantic-core annotated-types typing-inspection typing-extensions tensorboardX
for whl in "$dir"/b/ray-*.whl; do
    split -b 40M "$whl" "$dir/b/$(basename "$whl").part-"
    mv "$dir/b/$(basename "$whl").part-aa" "$dir/a/"
    rm "$whl"
done
du -sh "$dir/a" "$dir/b"
