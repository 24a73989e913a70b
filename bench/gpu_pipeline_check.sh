#!/usr/bin/env bash
# Pipeline HVP check on a GPU machine (PyTorch, no Ray): NCCL with >= 2 GPUs, gloo via host memory with one.
# Usage: bash bench/gpu_pipeline_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out/gpu}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.csv"
export PYTHONUNBUFFERED=1 MASTER_ADDR=127.0.0.1
python3 bench/gpu_pipeline_check.py --json "$out/gpu_pipeline_check.json" 2>&1 | tee "$out/gpu_pipeline_check.log"
