#!/usr/bin/env bash
# The one command for a lent GPU machine (see README "GPU check"). From the repository root:
#
#     bash python/bench/gpu_check.sh
#
# 1. builds the extension with the CUDA kernels against the torch already installed there
#    (no network there: --no-build-isolation --no-deps);
# 2. runs the test files that hold CUDA cases (they run because a device is present; the CPU-only
#    rest of the suite runs in CI and needs no device time);
# 3. runs every GPU benchmark;
# 4. prints one summary table last.
# Every log, JSON and the summary is copied under $OUT (when set) as soon as it is written, so a run
# cut short still returns what it finished.
# Budget: the whole script has a deadline, GPU_CHECK_BUDGET_S seconds from its start (default 480:
# under the device's 600 s per-command limit with room to spare). Each step's timeout is the smaller
# of its own cap and the time left (less a reserve for the summary); a step that would get less
# than its minimum is skipped, and the summary says so.
# GPU_CHECK_DRY_RUN=1 runs nothing: each step only "takes" its full timeout on a simulated clock,
# to check the budget logic (the worst case: every step hits its timeout).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HOME=$(mktemp -d)
# The GPU machine's interpreter is python3 (it may have no `python`); PYTHON overrides.
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
RESERVE=20          # seconds kept back for the summary
DRY=${GPU_CHECK_DRY_RUN:-0}
results=$(mktemp -d)
status=0
start=$SECONDS
fake=0              # seconds the dry run pretends its steps took
: > "$results/pytest.log"; : > "$results/pytest-summary.txt"; : > "$results/skipped.txt"
step() { echo; echo "==== $* ($(date +%T), $(( $(elapsed) ))s of ${BUDGET}s used)"; }
elapsed() { echo $(( SECONDS - start + fake )); }
left() { echo $(( BUDGET - RESERVE - $(elapsed) )); }
# save FILE...: copy to $OUT now (a cut run keeps what it finished).
save() { if [ -n "${OUT:-}" ]; then cp "$@" "$OUT"/ 2>/dev/null; fi; return 0; }
skipped() { echo "- $1: skipped, only $2 s of the ${BUDGET} s budget left (needs $3 s)" \
              | tee -a "$results/skipped.txt"; save "$results/skipped.txt"; status=1; }
# timed NAME CAP MIN CMD...: run CMD under timeout min(CAP, time left); skip it (exit status 125)
# when that is under MIN seconds. Sets $took to the limit it ran under.
timed() {
  local name=$1 cap=$2 min=$3; shift 3
  local l; l=$(left); took=$(( cap < l ? cap : l ))
  if [ "$took" -lt "$min" ]; then skipped "$name" "$l" "$min"; return 125; fi
  if [ "$DRY" = 1 ]; then echo "dry run: $name under timeout ${took}s"; fake=$(( fake + took )); return 0; fi
  timeout "$took" "$@"
}

step "build (TSQ_CUDA=ON)"
build_ok=1
timed build 300 60 env TSQ_CUDA=ON TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  "$PY" -m pip install --no-build-isolation --no-deps -q . -Cbuild-dir=/tmp/tsq-gpu-build \
  > "$results/build.log" 2>&1 || build_ok=0
cat "$results/build.log"; save "$results/build.log"
if [ $build_ok = 1 ] && [ "$DRY" != 1 ]; then
  (cd /tmp && timeout 60 "$PY" -c "import tsqlora_ext, json; print(json.dumps(tsqlora_ext.build_info()))") \
    || build_ok=0
fi
[ $build_ok = 1 ] || { echo "- build: FAILED (see build.log); tests and benchmarks not run" \
                         >> "$results/skipped.txt"; save "$results/skipped.txt"; status=1; }

CUDA_TESTS=(test_varrank_lora.py test_layers.py test_sensitivity.py test_realloc.py test_allocator.py
            test_train.py test_callback.py)
# Each entry: a benchmark script taking --device cuda --out DIR (see python/bench/common.py) and
# its cap in seconds. bench_step builds five copies of a 135M-parameter model and profiles 50
# training steps: its old 120 s cap cut it on the H200 in both runs, while the whole check had
# 135 s of its budget left.
BENCHES=(
  bench_lora_op.py:120
  bench_allocator.py:120
  bench_step.py:240
)
if [ $build_ok = 1 ]; then
  step "tests"
  # One pytest per file, from outside the source tree (so the installed package, with _C, is the
  # one imported): a crash in one file then cannot hide the results of the others.
  for t in "${CUDA_TESTS[@]}"; do
    out=$(cd /tmp && timed "$t" 120 20 "$PY" -m pytest "$OLDPWD/tests/$t" -q -rs \
          --import-mode=importlib -p no:cacheprovider 2>&1); rc=$?
    # $(...) ran in a subshell: replay its simulated time here.
    if [ $rc -eq 125 ]; then echo "$out"; status=1; continue; fi  # skipped() wrote the file
    [ "$DRY" = 1 ] && fake=$(( fake + $(echo "$out" | sed -n 's/.*under timeout \([0-9]*\)s.*/\1/p') ))
    echo "$out" >> "$results/pytest.log"
    echo "$out" | tail -4
    line=$(echo "$out" | grep -E " in [0-9.]+s" | tail -1)
    [ $rc -eq 124 ] && line="timed out"
    echo "- $t: ${line:-no result (exit status $rc)}" >> "$results/pytest-summary.txt"
    save "$results/pytest.log" "$results/pytest-summary.txt"
    [ $rc -eq 0 ] || status=1
  done

  step "benchmarks"
  for entry in "${BENCHES[@]}"; do
    b=${entry%%:*}
    echo "-- $b"
    timed "$b" "${entry##*:}" 30 "$PY" "python/bench/$b" --device cuda --out "$results"; rc=$?
    [ $rc -eq 125 ] && continue
    [ $rc -eq 0 ] || { echo "FAILED: $b (exit status $rc$([ $rc -eq 124 ] && echo ', timed out'))"; status=1; }
    ls "$results"/*.json >/dev/null 2>&1 && save "$results"/*.json
  done
fi

step "summary"
{
  echo "# GPU check $(date -u +%F) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo
  echo "torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null), command: \`bash python/bench/gpu_check.sh\`, $(elapsed) s of the ${BUDGET} s budget used"
  echo
  echo "tests (CUDA cases included):"
  cat "$results/pytest-summary.txt"
  if [ -s "$results/skipped.txt" ]; then echo; echo "not run (out of time or after a failed build):"; cat "$results/skipped.txt"; fi
  echo
  if [ "$DRY" != 1 ] && ls "$results"/*.json >/dev/null 2>&1; then timeout 30 "$PY" python/bench/summarize.py "$results"; fi
} | tee "$results/gpu-summary.md"
save "$results/gpu-summary.md"
exit $status
