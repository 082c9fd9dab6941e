#!/usr/bin/env bash
# Run the whole test suite: the main invocation, then the Triton kernels in Triton's CPU
# interpreter (TRITON_INTERPRET=1 must be set before triton is imported, hence a second
# invocation). pytest exits non-zero when it collects no test, so an empty run fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -m pytest -q tests --ignore=tests/triton "$@"
TRITON_INTERPRET=1 "$PY" -m pytest -q tests/triton "$@"
