#!/usr/bin/env bash
# The GPU comparisons of issues 10 and 13 in one run, on a machine with a CUDA GPU (docs/gpu_benchmarks.md).
#
#   bash benchmarks/gpu_run.sh [OUT_DIR]          # default: $OUT, else benchmarks/gpu_out
#
# 1. benchmarks/fused_step.py --device cuda: every model family fused against a loop of plain modules with
#    torch.optim, at S = 8, 32 and 128 slots. Needs torch only (transformers for the BERT row).
# 2. benchmarks/tune_sweep.py --device cuda: the ASHA sweep trained by ray_modelbatch (one slot host on the
#    GPU) and by standard Tune trials that each hold a fraction of the GPU, one process per trial and with
#    reuse_actors. Needs ray[tune]: where Ray is missing, wheels from benchmarks/gpu_wheels.sh under ./.whl are
#    installed into a temporary folder first; without them the sweep is skipped, with a note.
#
# Knobs (environment): FUSED_SLOTS (8,32,128), FUSED_MODELS (all), FUSED_MIN_TIME (0.2 s per timing),
# SWEEP_TRIALS (128), SWEEP_SLOTS (32), SWEEP_MAX_T (20), SWEEP_ARCH (mlp), SWEEP_RUNS (all three).
# Each part's markdown lands in OUT_DIR with the GPU's name (gpu.txt); record them in benchmarks/RESULTS.md.
set -uo pipefail
out=${1:-${OUT:-benchmarks/gpu_out}}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! $py -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_run.sh: torch sees no CUDA device here ($py); run it on a GPU machine" >&2
    exit 1
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$out/gpu.txt"

models=${FUSED_MODELS:+--models $FUSED_MODELS}
$py benchmarks/fused_step.py --device cuda --slots "${FUSED_SLOTS:-8,32,128}" $models \
    --min-time "${FUSED_MIN_TIME:-0.2}" --max-wait 5 --out "$out/fused_step_gpu.md" 2>&1 | tee "$out/fused_step_gpu.log"

if ! $py -c "import ray.tune" 2>/dev/null && [ -n "$(find .whl -type f -name '*.whl*' 2>/dev/null)" ]; then
    site=$(mktemp -d)
    for first in $(find .whl -type f -name '*.part-aa'); do  # a wheel split by gpu_wheels.sh, its pieces in any folder
        name=$(basename "${first%.part-aa}")
        find .whl -type f -name "$name.part-*" -printf '%f %p\n' | sort | cut -d' ' -f2 | xargs cat > "$site/$name"
    done
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site/lib" \
        $(find .whl -type f -name '*.whl') "$site"/*.whl && export PYTHONPATH="$PYTHONPATH:$site/lib" PATH="$site/lib/bin:$PATH"
fi
if $py -c "import ray.tune" 2>/dev/null; then
    $py benchmarks/tune_sweep.py --device cuda --trials "${SWEEP_TRIALS:-128}" --slots "${SWEEP_SLOTS:-32}" \
        --max-t "${SWEEP_MAX_T:-20}" --arch "${SWEEP_ARCH:-mlp}" \
        --runs "${SWEEP_RUNS:-ray_modelbatch,standard,standard+reuse}" \
        --out "$out/tune_sweep_gpu.md" 2>&1 | tee "$out/tune_sweep_gpu.log"
else
    echo "ray[tune] cannot be imported and no wheels are in ./.whl (benchmarks/gpu_wheels.sh): the Tune sweep" \
         "comparison is skipped" | tee "$out/tune_sweep_gpu.md"
fi
