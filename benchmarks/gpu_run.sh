#!/usr/bin/env bash
# The GPU comparisons of issues 10 and 13 in one run, on a machine with a CUDA GPU (docs/gpu_benchmarks.md).
#
#   bash benchmarks/gpu_run.sh [OUT_DIR]          # default: $OUT, else benchmarks/gpu_out
#
# 0. benchmarks/gpu_probe.py: the fused step's device syncs and a CUDA graph of it, under a minute (into gpu.txt).
# 1. benchmarks/fused_step.py --device cuda: every model family fused against a loop of plain modules with
#    torch.optim, at S = 8, 32 and 128 slots. Needs torch only (transformers for the BERT row).
# 1b. benchmarks/dropout_cost.py --device cuda: per-slot dropout masks against one shared draw.
# 2. benchmarks/tune_sweep.py --device cuda: the ASHA sweep trained by ray_modelbatch (one slot host on the
#    GPU) and by standard Tune trials that each hold a fraction of the GPU, one process per trial and with
#    reuse_actors. Needs ray[tune]: where Ray is missing, wheels from benchmarks/gpu_wheels.sh under ./.whl are
#    installed into a temporary folder first; without them the sweep is skipped, with a note.
#
# Knobs (environment): PROBE_TIMEOUT (90 s), FUSED_SLOTS (8,32,128), FUSED_MODELS (all), FUSED_MIN_TIME (0.2 s
# per timing), FUSED_TIMEOUT (300 s), DROPOUT_SLOTS (32,128), DROPOUT_TIMEOUT (120 s), SWEEP_TRIALS (128), SWEEP_SLOTS (32), SWEEP_MAX_T (20), SWEEP_ARCH (mlp; a list such as
# mlp,cnn runs one sweep each), SWEEP_RUNS (all three), SWEEP_HOSTS_PER_GPU (2: ray_modelbatch's run once more
# with that many slot hosts sharing the GPU, each with --slots slots; a list runs each, empty skips it),
# SWEEP_TIMEOUT (300 s per sweep). A part that runs past
# its timeout is stopped and the next one starts; the rows it printed stay in its log. nvidia-smi dmon samples
# the GPU's utilization every second during the sweeps (dmon.txt; the sweep log prints the clock time at which
# each run starts). Each part's markdown lands in OUT_DIR with the GPU's name (gpu.txt); record them in
# benchmarks/RESULTS.md.
set -uo pipefail
SWEEP_ARCH=${SWEEP_ARCH:-mlp}
SWEEP_HOSTS_PER_GPU=${SWEEP_HOSTS_PER_GPU-2}
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
# Device syncs per fused step and a CUDA graph of it (benchmarks/gpu_probe.py; under a minute): into gpu.txt too.
timeout -k 10 "${PROBE_TIMEOUT:-90}" $py benchmarks/gpu_probe.py 2>&1 | tee -a "$out/gpu.txt"

if ! $py -c "import ray.tune" 2>/dev/null && [ -n "$(find .whl -maxdepth 1 -name 'ray-*.whl' 2>/dev/null)" ]; then
    site=$(mktemp -d)  # the wheels of benchmarks/gpu_wheels.sh, installed for this run only
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$site" PATH="$site/bin:$PATH"
fi

models=${FUSED_MODELS:+--models $FUSED_MODELS}
timeout -k 10 "${FUSED_TIMEOUT:-300}" $py benchmarks/fused_step.py --device cuda --slots "${FUSED_SLOTS:-8,32,128}" $models \
    --min-time "${FUSED_MIN_TIME:-0.2}" --max-wait 5 --out "$out/fused_step_gpu.md" 2>&1 | tee "$out/fused_step_gpu.log"

# What each slot's own dropout generator costs on a GPU (a kernel launch per slot and dropout call).
timeout -k 10 "${DROPOUT_TIMEOUT:-120}" $py benchmarks/dropout_cost.py --device cuda --slots "${DROPOUT_SLOTS:-32,128}" \
    --min-time 0.1 --out "$out/dropout_cost_gpu.md" 2>&1 | tee "$out/dropout_cost_gpu.log"

if ray_err=$($py -c "import ray.tune" 2>&1); then
    nvidia-smi dmon -s u -d 1 -o T > "$out/dmon.txt" 2>&1 &
    dmon=$!
    for arch in ${SWEEP_ARCH//,/ }; do
        timeout -k 10 "${SWEEP_TIMEOUT:-300}" $py benchmarks/tune_sweep.py --device cuda --trials "${SWEEP_TRIALS:-128}" \
            --slots "${SWEEP_SLOTS:-32}" --max-t "${SWEEP_MAX_T:-20}" --arch "$arch" \
            --runs "${SWEEP_RUNS:-ray_modelbatch,standard+reuse,standard}" \
            --out "$out/tune_sweep_gpu_$arch.md" 2>&1 | tee -a "$out/tune_sweep_gpu.log"
        ray stop --force >/dev/null 2>&1  # a sweep stopped at its timeout leaves its Ray processes behind
        for hosts in ${SWEEP_HOSTS_PER_GPU//,/ }; do  # ray_modelbatch again, with several slot hosts sharing the GPU
            timeout -k 10 "${SWEEP_TIMEOUT:-300}" $py benchmarks/tune_sweep.py --device cuda --trials "${SWEEP_TRIALS:-128}" \
                --slots "${SWEEP_SLOTS:-32}" --max-t "${SWEEP_MAX_T:-20}" --arch "$arch" --runs ray_modelbatch \
                --hosts-per-gpu "$hosts" --out "$out/tune_sweep_gpu_${arch}_${hosts}hosts.md" 2>&1 | tee -a "$out/tune_sweep_gpu.log"
            ray stop --force >/dev/null 2>&1
        done
    done
    kill "$dmon" 2>/dev/null
else
    echo "ray[tune] cannot be imported ($(echo "$ray_err" | tail -1)); wheels for it: benchmarks/gpu_wheels.sh," \
         "into ./.whl. The Tune sweep comparison is skipped" | tee "$out/tune_sweep_gpu.md"
fi
