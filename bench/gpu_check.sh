#!/usr/bin/env bash
# GPU checks for a machine with a CUDA device and PyTorch (Ray not needed), in one call:
# CUDA parity, the NCCL path of the sharded operator and HVP throughput (gpu_check.py), then
# pipeline products over NCCL with >= 2 GPUs or gloo via host memory with one, sequential against
# overlapped (gpu_pipeline_check.py), then a ~1B-parameter transformers Llama in bf16 (gpu_llama_check.py).
# Usage: bash bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out/gpu}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.csv"
export PYTHONUNBUFFERED=1 MASTER_ADDR=127.0.0.1
for check in gpu_check gpu_pipeline_check gpu_llama_check; do
    python3 "bench/$check.py" --json "$out/$check.json" 2>&1 | tee "$out/$check.log"
done
