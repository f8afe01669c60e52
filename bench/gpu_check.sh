#!/usr/bin/env bash
# The GPU check: what no CPU run of this project can show, in one go on a CUDA machine, under 8 minutes on one GPU
# (its two parts are cut off at 4 and at 3 min 20 s). Run it from a clone, in the environment the README's GPU
# set-up makes:
#
#   bash bench/gpu_check.sh [RESULTS_FILE]
#
# 1. The tests marked `cuda` (`pytest -m cuda`): LAMB on CUDA against the CPU; the host-offloaded optimizer's
#    pinned copies under the float16 GradScaler; packed rows with only the memory-efficient SDPA kernel allowed
#    (an ineligible block-diagonal mask is then an error, not a silent fall back to the math kernel) in float32,
#    bfloat16 and float16; every one-process case of the device-model matrix (tests/test_device_matrix.py: the
#    V100 cases in float16 with static and dynamic loss scales, offload, ZeRO, packing) for real on this GPU,
#    with resume compared under deterministic kernels; its two-process cases over NCCL where there are two GPUs.
# 2. `bench/pretrain.py --preset bert-base`: BERT-base phase-1 steps, this project against the stock Trainer,
#    with samples/s, memory and MFU.
#
# Everything is written to RESULTS_FILE (default bench/gpu_check-<UTC time>.txt) as well as the terminal; the
# exit status is 0 only if every part passed. Record the numbers in bench/RESULTS.md with the date and GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-bench/gpu_check-$(date -u +%Y%m%dT%H%M%SZ).txt}
python=${PYTHON:-python}

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "error: bench/gpu_check.sh needs a CUDA GPU and a CUDA build of torch ($python sees none); run it on a GPU" \
         "machine after the README's GPU set-up (set PYTHON=... for another interpreter)" >&2
    exit 2
fi
if [ ! -d "$(dirname "$results")" ]; then
    echo "error: the folder of $results does not exist; name a results file in an existing folder" >&2
    exit 2
fi
if [ -e "$results" ]; then
    echo "error: $results exists; name another results file (bash bench/gpu_check.sh NEW_FILE)" >&2
    exit 2
fi

# Resumed and uninterrupted runs are compared with deterministic kernels: cuBLAS reads this before its first use.
export CUBLAS_WORKSPACE_CONFIG=:4096:8

{
    status=0
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
    "$python" -c 'import torch, transformers, accelerate; print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, accelerate {accelerate.__version__}, {torch.cuda.device_count()} GPU(s): {torch.cuda.get_device_name(0)}")'

    echo
    echo "## 1. tests marked cuda"
    start=$SECONDS
    timeout 240 "$python" -m pytest -q -m cuda -rs -p no:cacheprovider tests || status=1
    echo "(tests: $((SECONDS - start)) s)"

    echo
    echo "## 2. bench/pretrain.py --preset bert-base"
    start=$SECONDS
    timeout 200 "$python" bench/pretrain.py --preset bert-base || status=1
    echo "(bench: $((SECONDS - start)) s)"

    echo
    if [ "$status" = 0 ]; then echo "GPU check passed"; else echo "GPU check FAILED (see above)"; fi
    exit "$status"
} 2>&1 | tee "$results"
status=${PIPESTATUS[0]}
echo "results written to $results"
exit "$status"
