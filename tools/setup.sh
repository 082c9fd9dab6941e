#!/usr/bin/env bash
# Set up fastkd on a fresh machine: a virtual environment in .venv with the pinned
# dependencies of requirements-dev.txt / constraints.txt, and fastkd installed (editable)
# with its compiled extension fastkd._C built against that torch: C++ CPU kernels always;
# CUDA kernels too when a CUDA toolkit matching torch's CUDA is found (for the visible
# GPUs, else for setup.py's DEFAULT_CUDA_ARCHS). No environment variable is needed; the
# knobs (README, "Build knobs"): TORCH_CUDA_ARCH_LIST, FASTKD_NO_CUDA=1, FASTKD_FORCE_CUDA=1,
# FASTKD_SKIP_EXT=1, MAX_JOBS (default 2), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt -c constraints.txt
export MAX_JOBS=${MAX_JOBS:-2}
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
# tools/run_tests.sh (tests/conftest.py) reads this: an extension that was meant to be
# built but is missing or stale fails the test run instead of skipping its tests.
case "${FASTKD_SKIP_EXT:-0}" in
  1|true|yes|on) ext=false ;;
  *) ext=true ;;
esac
echo "{\"extension\": $ext}" > .venv/fastkd-setup.json
.venv/bin/fastkd info
echo "fastkd set-up: $(( $(date +%s) - start )) s, .venv holds $(du -sh .venv | cut -f1)"
