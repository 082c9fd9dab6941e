#!/usr/bin/env bash
# One-shot GPU acceptance run of fastkd, from a bare machine with a GPU, torch, triton, a
# CUDA toolkit (nvcc) and pytest installed, and no network:
#
#   1. env      versions, nvidia-smi, nvcc, the git commit           -> env.txt
#   2. build    fastkd._C with its CUDA kernels for this GPU's architecture, against the
#               installed torch (pip install --no-build-isolation --no-deps -e .)
#                                                                     -> build.log
#   3. tests    the CUDA and Triton tests on the GPU                  -> tests.log, junit.xml
#   4. check    fastkd info --check (every backend against the reference, each device)
#                                                                     -> check.txt
#   5. bench    fastkd bench --device cuda --quick                    -> bench.log, bench/
#
# Everything lands in benchmarks/results/gpu-<device name>/ (or --out DIR), with summary.txt
# giving each stage's status and seconds. Each stage has a time limit so that the whole run
# stays under 8 minutes on an H100/H200; a stage that fails or times out is recorded and the
# next one still runs. Exit status: 0 when every stage passed, 1 otherwise, 2 when the run
# cannot start (no GPU, no Python with torch, a bad flag).
#
#   tools/gpu_check.sh [--dry-run] [--out DIR] [--skip-build]
#
# --dry-run prints what would run (also without a GPU) and runs nothing. --skip-build uses
# the fastkd already installed. PYTHON selects the interpreter (default: .venv/bin/python
# when present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

die() { echo "gpu_check: $*" >&2; exit 2; }

DRY=0
SKIP_BUILD=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT=$2; shift ;;
    --out=*) OUT=${1#--out=} ;;
    -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (expected --dry-run, --skip-build, --out DIR or --help)" ;;
  esac
  shift
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
command -v "$PY" >/dev/null 2>&1 || die "no Python interpreter '$PY' (set PYTHON to the one that has torch)"
"$PY" -c "import torch" 2>/dev/null || die "'$PY' cannot import torch (set PYTHON to the one that has torch)"

# Stage time limits (seconds), GPU_CHECK_T_* to change them: 450 s in all, plus a few seconds
# for the environment, under 8 minutes.
T_BUILD=${GPU_CHECK_T_BUILD:-150}
T_TESTS=${GPU_CHECK_T_TESTS:-150}
T_CHECK=${GPU_CHECK_T_CHECK:-30}
T_BENCH=${GPU_CHECK_T_BENCH:-120}

# The GPU: name, folder-safe name, compute capability ("9.0").
GPU=$("$PY" - <<'EOF' 2>/dev/null
import re, torch
if torch.cuda.is_available():
    name = torch.cuda.get_device_name(0)
    a, b = torch.cuda.get_device_capability(0)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    print(f"{slug}|{a}.{b}|{name}")
EOF
)
if [ -z "$GPU" ]; then
  if [ "$DRY" = 1 ]; then
    GPU="<device-name>|<arch>|(no GPU visible here)"
  else
    die "no CUDA device visible (torch.cuda.is_available() is False); run this on a machine with an NVIDIA GPU, or see what it would do with --dry-run"
  fi
fi
SLUG=${GPU%%|*}; REST=${GPU#*|}; ARCH=${REST%%|*}; NAME=${REST#*|}
OUT=${OUT:-benchmarks/results/gpu-$SLUG}

# The tests that exercise the GPU backends: the Triton tests (compiled, not interpreted),
# every fastkd_triton op traced and compiled, the op tests' cuda/triton parametrisations,
# the self-check's tests.
TRITON_TESTS="tests/triton tests/test_triton_compile.py"
OP_TESTS="tests/test_tv_loss.py tests/test_image_distance.py tests/test_cross_class_contrastive.py \
tests/test_langevin.py tests/test_ot.py tests/test_bn_stats_loss.py tests/test_gmm_select.py tests/test_backend.py"
XDIST=""
if "$PY" -c "import xdist" 2>/dev/null; then XDIST="-n 8"; fi
PYTEST="$PY -m pytest -q -rfE -p no:cacheprovider $XDIST"

BUILD_CMD="MAX_JOBS=\$(nproc) TORCH_CUDA_ARCH_LIST=$ARCH FASTKD_FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps --no-index -e ."
TESTS_CMD="env -u TRITON_INTERPRET $PYTEST --junitxml=$OUT/junit.xml $TRITON_TESTS tests/test_selfcheck.py $OP_TESTS -k 'cuda or triton or gpu or selfcheck'"
CHECK_CMD="env -u TRITON_INTERPRET $PY -m fastkd info --check"
BENCH_CMD="$PY -m fastkd bench --device cuda --quick --min-time 0.1 --out $OUT/bench"

if [ "$DRY" = 1 ]; then
  echo "gpu_check (dry run): GPU $NAME, sm_$ARCH, results in $OUT/"
  echo "  env    -> $OUT/env.txt"
  if [ "$SKIP_BUILD" = 1 ]; then echo "  build  (skipped: --skip-build)"
  else echo "  build  (<= ${T_BUILD}s) $BUILD_CMD -> $OUT/build.log"; fi
  echo "  tests  (<= ${T_TESTS}s) $TESTS_CMD -> $OUT/tests.log"
  echo "  check  (<= ${T_CHECK}s) $CHECK_CMD -> $OUT/check.txt"
  echo "  bench  (<= ${T_BENCH}s) $BENCH_CMD -> $OUT/bench.log"
  exit 0
fi

mkdir -p "$OUT" || die "cannot create the results folder $OUT"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
FAILED=0
START=$(date +%s)

# stage NAME LIMIT LOG COMMAND: run COMMAND (a shell string) with a time limit, its output
# (stdout and stderr) into LOG, and record the result in summary.txt.
stage() {
  local name=$1 limit=$2 log=$3 cmd=$4 t0 rc status
  t0=$(date +%s)
  echo "gpu_check: $name ..."
  echo "\$ $cmd" > "$log"
  timeout --kill-after=10 "$limit" bash -c "$cmd" >> "$log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then status=ok
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT after ${limit}s"; FAILED=1
  else status="FAIL (exit $rc)"; FAILED=1; fi
  printf '%-6s %-22s %4ss  %s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$(basename "$log")" | tee -a "$SUMMARY"
}

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "host: $(uname -srm), $(nproc) cores"
  echo "gpu: $NAME (sm_$ARCH)"
  "$PY" - <<'EOF'
import platform, torch
print(f"python: {platform.python_version()}")
print(f"torch: {torch.__version__} (CUDA {torch.version.cuda})")
try:
    import triton
    print(f"triton: {triton.__version__}")
except Exception as e:
    print(f"triton: not importable ({type(e).__name__})")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i}: {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
EOF
  echo "--- nvcc --version"; nvcc --version 2>&1 || echo "nvcc: not found (the CUDA kernels cannot be built)"
  echo "--- nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not found"
} > "$OUT/env.txt" 2>&1
echo "gpu_check: $NAME, results in $OUT/"

if [ "$SKIP_BUILD" = 1 ]; then
  echo "build  skipped (--skip-build)" | tee -a "$SUMMARY"
else
  stage build "$T_BUILD" "$OUT/build.log" "$BUILD_CMD"
fi
# What the build produced (and whether the CUDA kernels are in it), for the record.
env -u TRITON_INTERPRET "$PY" -m fastkd info >> "$OUT/env.txt" 2>&1
stage tests "$T_TESTS" "$OUT/tests.log" "$TESTS_CMD"
stage check "$T_CHECK" "$OUT/check.txt" "$CHECK_CMD"
stage bench "$T_BENCH" "$OUT/bench.log" "$BENCH_CMD"

echo "total  $(( $(date +%s) - START ))s" | tee -a "$SUMMARY"
grep -E "passed|failed" "$OUT/tests.log" | tail -1 | sed 's/^/tests: /' >> "$SUMMARY"
grep -E "^self-check: .* checks" "$OUT/check.txt" | tail -1 >> "$SUMMARY"
if [ $FAILED -ne 0 ]; then
  echo "gpu_check: some stages failed; see $SUMMARY and the logs beside it"
  exit 1
fi
echo "gpu_check: every stage passed; see $SUMMARY"
