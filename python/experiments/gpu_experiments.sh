#!/usr/bin/env bash
# The experiments that need a GPU's speed, for a lent GPU machine (no network, no bundled packages).
#
# Here, first:  python python/experiments/gpu_bundle.py    # model + data -> .gpu_carry/site
# There:        bash python/experiments/gpu_experiments.sh [SECONDS]   (carry .gpu_carry)
#
# Run it after python/bench/gpu_check.sh has installed the CUDA build there (same machine, same
# lease). Each experiment resumes from the runs already in its results file and writes every run
# as it finishes, and each gets its share of SECONDS (default 480) under `timeout`, so a lease that
# ends early keeps what finished; a second call carries on where the first stopped. The results
# (python/experiments/results/) are copied under $OUT when it is set, to be committed from here.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD/.gpu_carry/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
budget=${1:-480}
res=python/experiments/results
[ -d .gpu_carry/site ] || { echo "no .gpu_carry/site: run python/experiments/gpu_bundle.py here and carry it"; exit 1; }

echo "==== compare_methods: the methods not yet in $res/compare_methods-runs.jsonl ($(date +%T))"
timeout $((budget / 2)) "$PY" python/experiments/compare_methods.py --device cuda --jobs 8
echo "==== noisy_labels ($(date +%T))"
timeout $((budget / 2)) "$PY" python/experiments/noisy_labels.py --device cuda --jobs 8
"$PY" python/experiments/compare_methods.py --summarize >/dev/null
if [ -n "${OUT:-}" ]; then
  tar -czf "$OUT/experiment-results.tgz" "$res" && echo "results in \$OUT/experiment-results.tgz"
fi
