#!/usr/bin/env bash
# Set up fastkd on a fresh machine: a virtual environment in .venv with pinned
# dependencies, and fastkd installed (editable) with its compiled extension built against
# that torch. Environment knobs: FASTKD_FORCE_CUDA=1 / TORCH_CUDA_ARCH_LIST (compile CUDA
# kernels without a GPU), FASTKD_NO_CUDA=1 (CPU kernels only), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt -c constraints.txt
export MAX_JOBS=${MAX_JOBS:-2}
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/fastkd info
