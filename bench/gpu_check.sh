#!/usr/bin/env bash
# GPU check for a machine with a CUDA device and PyTorch (Ray not needed):
# CUDA parity, the NCCL path of the sharded operator, HVP throughput.
# Usage: bash bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-out/gpu}}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia-smi.csv"
export PYTHONUNBUFFERED=1 MASTER_ADDR=127.0.0.1
python3 bench/gpu_check.py --json "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
