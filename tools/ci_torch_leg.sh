#!/usr/bin/env bash
# One CI leg against another torch than the pinned one: build fastkd and run the tests with
# torch==VERSION and the triton that this torch requires.
#
#   bash tools/ci_torch_leg.sh VERSION [PYTEST_ARGS...]
#
# - a fresh virtual environment .venv-torch-VERSION in the repository root (removed again
#   when CI=true),
# - torch==VERSION, its triton picked by pip from torch's own requirement, and the test
#   dependencies of requirements-dev.txt with constraints.txt applied, except the pins that
#   belong to the pinned torch (torch, torchvision, triton, setuptools; torchvision is not
#   installed: nothing in fastkd or its tests imports it),
# - fastkd built and installed (not editable) from a temporary copy of the working tree, so
#   that legs running side by side share no build/ folder,
# - a check that fastkd._C loads and was built for the running torch,
# - the test suite on the installed package: the main invocation, then the Triton kernels in
#   Triton's CPU interpreter (TRITON_INTERPRET=1 must be set before triton is imported).
#   PYTEST_ARGS go to both invocations; the default, -x -m "not slow", leaves out the tests
#   marked slow (the main CI leg runs them with the pinned torch), which keeps a leg near
#   11 minutes on 2 cores; -x alone runs everything.
#
# Environment: PYTHON (default python3), MAX_JOBS (default 2). FASTKD_NO_CUDA defaults to 1:
# the main CI leg (.ci/run) compiles the CUDA sources against the pinned torch, so these
# legs build the CPU kernels only, which is all that a machine without a GPU tests (the CUDA
# kernels would add 10-20 minutes on 2 cores); FASTKD_NO_CUDA=0 compiles them too where the
# CUDA toolkit's major version matches torch's.
set -euo pipefail

if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+\.[0-9]+(\.[0-9]+)?([+.a-z0-9]*)$ ]]; then
  echo "usage: bash tools/ci_torch_leg.sh TORCH_VERSION [PYTEST_ARGS...]   (e.g. 2.11.0)" >&2
  exit 2
fi
VERSION=$1
shift
if [ $# -eq 0 ]; then
  set -- -x -m "not slow"
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
VENV=$ROOT/.venv-torch-$VERSION
export MAX_JOBS=${MAX_JOBS:-2}
export FASTKD_NO_CUDA=${FASTKD_NO_CUDA:-1}

leg_start=$(date +%s)
step_start=$leg_start
say() { echo "leg torch $VERSION: $*"; }
step_done() {
  local now
  now=$(date +%s)
  say "$1 took $((now - step_start)) s"
  step_start=$now
}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastkd-torch-$VERSION.XXXXXX")
cleanup() {
  rm -rf "$WORK"
  # each environment takes 5-6 GB; a CI run (CI=true) leaves none behind in its clone
  if [ "${CI:-}" = true ]; then rm -rf "$VENV"; fi
}
trap cleanup EXIT

# --- dependency files without the pinned torch's pins -------------------------------------
# The setuptools pin goes too: torch declares the setuptools it works with (2.11: <82).
torch_pkgs='(torch|torchvision|triton)[[:space:]]*([=<>!~;[]|$)'
grep -viE "^[[:space:]]*($torch_pkgs|setuptools[[:space:]]*([=<>!~;[]|$))" constraints.txt \
  >"$WORK/constraints.txt" || true
grep -viE "^[[:space:]]*$torch_pkgs" requirements-dev.txt >"$WORK/requirements.txt" || true
# This file replaces any constraint file named in a pip configuration (one may cap torch
# below the version under test); the package indexes configured there stay in use.
export PIP_CONSTRAINT=$WORK/constraints.txt

# --- virtual environment and dependencies ---------------------------------------------------
rm -rf "$VENV"
"$PY" -m venv "$VENV"
VPY=$VENV/bin/python
# pip warns about each package missing from a configured local index; only the rest is shown
pip_install() {
  "$VPY" -m pip install -q "$@" 2>&1 |
    sed '/^WARNING: Location .* is ignored: it is neither a file nor a directory\.$/d'
}
pip_install --upgrade pip
# torch (with the triton it requires) and what building the wheel takes; nothing else yet
pip_install "torch==$VERSION" setuptools wheel ninja
# Triton's interpreter before 3.7 turns 1-element numpy arrays into Python ints, an error
# since numpy 2.4 ("only 0-dimensional arrays can be converted to Python scalars"): with
# such a triton the TRITON_INTERPRET=1 tests run on the newest numpy before 2.4.
if ! "$VPY" -c 'import sys, triton; sys.exit(tuple(map(int, triton.__version__.split(".")[:2])) < (3, 7))'; then
  grep -viE '^[[:space:]]*numpy[[:space:]]*([=<>!~;[]|$)' "$WORK/constraints.txt" >"$WORK/c.txt" || true
  echo "numpy<2.4" >>"$WORK/c.txt"
  mv "$WORK/c.txt" "$WORK/constraints.txt"
fi
"$VPY" - <<'EOF'
import torch, triton
print(f"leg: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
EOF
step_done "torch and build tools"

# --- the wheel ------------------------------------------------------------------------------
# Built from the working tree as it is (uncommitted changes included, ignored files such as
# an in-place fastkd/_C*.so or build/ left out).
mkdir "$WORK/src"
git ls-files -z -co --exclude-standard |
  while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
  tar --null -T - -cf - | tar -xf - -C "$WORK/src"
if ! "$VPY" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/dist" "$WORK/src" >"$VENV/build.log" 2>&1; then
  tail -n 80 "$VENV/build.log"
  say "build failed (whole log: $VENV/build.log)"
  exit 1
fi
# setup.py's own lines (it runs twice under pip: once for the build requirements)
grep -E '^[[:space:]]*fastkd: ' "$VENV/build.log" | awk '!seen[$0]++' || true
step_done "wheel build"

# --- the wheel with only its declared dependencies, and the main job ------------------------
# pip resolves the wheel's own requirements (pyproject.toml [project].dependencies) and
# nothing else; the test dependencies come later. Each method's demo runs at a tiny budget
# from a folder outside the source tree, so the installed package is what runs.
pip_install "$WORK"/dist/fastkd-*.whl
say "packages: $("$VPY" -m pip list --format=freeze 2>/dev/null | grep -viE '^(nvidia|cuda)-' | tr '\n' ' ')"
mkdir "$WORK/run"
(cd "$WORK/run" && "$VPY" - <<'EOF'
import fastkd
from fastkd import _backend as B
assert B.has_extension(), f"fastkd._C is not usable: {B.backend_status('cpp').reason}"
print(f"leg: fastkd from {fastkd.__file__}; fastkd._C {B.extension_info()}")
EOF
)
FK=$VENV/bin/fastkd
(cd "$WORK/run" &&
  "$FK" --version &&
  "$FK" demo --method cake --num-samples 60 --steps 2 --epochs 1 --no-baseline --quiet --out demo-cake &&
  "$FK" demo --method lake --num-samples 60 --steps 2 --epochs 1 --no-baseline --quiet --out demo-lake &&
  "$FK" demo --method mekd --quick --no-baseline \
    --quiet --out demo-mekd &&
  "$FK" demo --method tadfkd --quick --out demo-tadfkd >/dev/null)
step_done "wheel with its declared dependencies only: fastkd demo, every method"

# --- test dependencies ----------------------------------------------------------------------
pip_install -r "$WORK/requirements.txt"
say "installed $(du -sh "$VENV" | cut -f1) into $VENV"
step_done "test dependencies"
# The source copy's package goes, so that the tests (run from the copy: some read csrc/)
# import the installed fastkd and its fastkd._C.
rm -rf "$WORK/src/fastkd" "$WORK/src/build"

# --- tests ----------------------------------------------------------------------------------
# FASTKD_REQUIRE_EXT=1: an extension that does not load fails the run instead of skipping
# every compiled-backend test.
export FASTKD_REQUIRE_EXT=1
say "pytest arguments: $*"
(cd "$WORK/src" && "$VPY" -m pytest -q -p no:cacheprovider tests --ignore=tests/triton "$@")
step_done "tests"
(cd "$WORK/src" && TRITON_INTERPRET=1 "$VPY" -m pytest -q -p no:cacheprovider tests/triton "$@")
step_done "Triton interpreter tests"
say "total $(($(date +%s) - leg_start)) s"
