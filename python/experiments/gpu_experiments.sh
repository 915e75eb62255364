#!/usr/bin/env bash
# The experiments that need a GPU's speed, for a lent GPU machine (no network, no bundled packages).
#
# MiniLM (compare_methods' main grid, noisy_labels):
#   here, first:  python python/experiments/gpu_bundle.py    # model + data -> .gpu_carry/site
#   there:        bash python/experiments/gpu_experiments.sh [SECONDS]   (carry .gpu_carry/site)
# SmolLM2-135M on the full Rotten Tomatoes split (its 94 MiB file needs two transfers):
#   here, first:  python python/experiments/gpu_bundle.py --smollm2
#   there:        one call carrying .gpu_carry/smollm2-a (it may run `true`), then at once, while
#                 the machine is still warm: bash python/experiments/gpu_experiments.sh smollm2
#                 [SECONDS] carrying .gpu_carry/smollm2-b
#
# Run it after python/bench/gpu_check.sh has installed the CUDA build there (same machine, same
# lease). Each experiment resumes from the runs already in its results file and writes every run
# as it finishes, and each gets its share of SECONDS (default 480) under `timeout`, so a lease that
# ends early keeps what finished; a second call carries on where the first stopped. The results
# (python/experiments/results/) are copied under $OUT when it is set, to be committed from here.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
mode=minilm budget=480
for arg in "$@"; do
  case $arg in
    smollm2) mode=smollm2 ;;
    ''|*[!0-9]*) echo "usage: gpu_experiments.sh [smollm2] [SECONDS]; got '$arg'" >&2; exit 2 ;;
    *) budget=$arg ;;
  esac
done
res=python/experiments/results
status=0
# run CMD...: run it; a failure (a timeout included) is reported and makes the script's exit
# status 1 at the end, after the results that did finish are packed.
run() {
  "$@" && return 0
  local rc=$?
  echo "FAILED (exit status $rc): $*" >&2
  status=1
  return $rc
}

if [ $mode = smollm2 ]; then
  "$PY" python/experiments/gpu_bundle.py --join-smollm2 || exit 1
  export PYTHONPATH=$PWD/.gpu_carry/smollm2-a/site${PYTHONPATH:+:$PYTHONPATH}
  echo "==== compare_methods --model smollm2, full split ($(date +%T))"
  run timeout "$budget" "$PY" python/experiments/compare_methods.py --model smollm2 --device cuda \
    --jobs 8 --methods lora adalora tsqlora
  run "$PY" python/experiments/compare_methods.py --model smollm2 --device cuda \
    --methods lora adalora tsqlora --summarize >/dev/null
else
  [ -d .gpu_carry/site ] || { echo "no .gpu_carry/site: run python/experiments/gpu_bundle.py here and carry it"; exit 1; }
  export PYTHONPATH=$PWD/.gpu_carry/site${PYTHONPATH:+:$PYTHONPATH}
  # The parameter-budget runs first: the equal-parameter ordering is the comparison the CPU grid
  # could only run in part (one rate pair, no GPU-sized grid).
  echo "==== compare_methods: TsqLoRA with a parameter budget, beside LoRA and AdaLoRA ($(date +%T))"
  run timeout $((budget / 4)) "$PY" python/experiments/compare_methods.py --device cuda --jobs 8 \
    --methods lora adalora tsqlora tsqlora_params
  echo "==== compare_methods: the methods not yet in $res/compare_methods-runs.jsonl ($(date +%T))"
  run timeout $((budget / 4)) "$PY" python/experiments/compare_methods.py --device cuda --jobs 8
  echo "==== noisy_labels ($(date +%T))"
  run timeout $((budget / 2)) "$PY" python/experiments/noisy_labels.py --device cuda --jobs 8
  run "$PY" python/experiments/compare_methods.py --summarize >/dev/null
fi
if [ -n "${OUT:-}" ]; then
  run tar -czf "$OUT/experiment-results.tgz" "$res" && echo "results in \$OUT/experiment-results.tgz"
fi
exit $status
