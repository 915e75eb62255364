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
# 4. prints one summary table last, and copies table and JSON under $OUT when it is set.
# Budget: the whole script must finish in under 8 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HOME=$(mktemp -d)
# The GPU machine's interpreter is python3 (it may have no `python`); PYTHON overrides.
PY=${PYTHON:-$(command -v python3 || command -v python)}
results=$(mktemp -d)
status=0
step() { echo; echo "==== $* ($(date +%T))"; }

step "build (TSQ_CUDA=ON)"
TSQ_CUDA=ON TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  "$PY" -m pip install --no-build-isolation --no-deps -q . -Cbuild-dir=/tmp/tsq-gpu-build || exit 1
(cd /tmp && "$PY" -c "import tsqlora_ext, json; print(json.dumps(tsqlora_ext.build_info()))") || exit 1

step "tests"
CUDA_TESTS=(test_varrank_lora.py test_layers.py test_sensitivity.py test_realloc.py test_allocator.py
            test_train.py test_callback.py)
# One pytest per file, from outside the source tree (so the installed package, with _C, is the one
# imported): a crash in one file then cannot hide the results of the others.
: > "$results/pytest.log"; : > "$results/pytest-summary.txt"
for t in "${CUDA_TESTS[@]}"; do
  out=$(cd /tmp && timeout 120 "$PY" -m pytest "$OLDPWD/tests/$t" -q -rs --import-mode=importlib \
        -p no:cacheprovider 2>&1); rc=$?
  echo "$out" >> "$results/pytest.log"
  echo "$out" | tail -4
  line=$(echo "$out" | grep -E " in [0-9.]+s" | tail -1)
  echo "- $t: ${line:-no result (exit status $rc)}" >> "$results/pytest-summary.txt"
  [ $rc -eq 0 ] || status=1
done

step "benchmarks"
# Each entry: a benchmark script taking --device cuda --out DIR (see python/bench/common.py).
BENCHES=(
  bench_lora_op.py
  bench_allocator.py
  bench_step.py
)
for b in "${BENCHES[@]}"; do
  echo "-- $b"
  timeout 120 "$PY" "python/bench/$b" --device cuda --out "$results" || { echo "FAILED: $b"; status=1; }
done

step "summary"
{
  echo "# GPU check $(date -u +%F) on $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
  echo
  echo "torch $("$PY" -c 'import torch; print(torch.__version__)'), command: \`bash python/bench/gpu_check.sh\`"
  echo
  echo "tests (CUDA cases included):"
  cat "$results/pytest-summary.txt"
  echo
  if ls "$results"/*.json >/dev/null 2>&1; then "$PY" python/bench/summarize.py "$results"; fi
} | tee "$results/gpu-summary.md"
if [ -n "${OUT:-}" ]; then cp "$results"/*.md "$results"/*.json "$results/pytest.log" "$OUT"/ 2>/dev/null; fi
exit $status
