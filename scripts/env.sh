# Create (or reuse) the project's virtualenv and install what it needs. Sourced by the other scripts.
#
#   MEGATRON_RPO_VENV  virtualenv directory (default: .venv in the repository)
#   PYTHON             interpreter that creates it (default: python3; 3.11 is what we test)
#   TORCH_SPEC         torch requirement installed before anything else (default: torch==2.13.0,
#                      the CPU build here; a package that depends on torch would otherwise pull
#                      several GB of CUDA wheels). On a GPU container use the container's torch:
#                      MEGATRON_RPO_VENV_ARGS=--system-site-packages and it is reused.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGATRON_RPO_VENV:-$ROOT/.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating virtualenv $VENV"
    "${PYTHON:-python3}" -m venv ${MEGATRON_RPO_VENV_ARGS:-} "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

if ! python -c "import torch" 2>/dev/null; then
    echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0} first"
    python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
fi
# The package is installed editable: code changes need no reinstall, only a change of what it
# declares (setup.py, pyproject.toml). The stamp records the declaration last installed.
STAMP="$VENV/.megatron_rpo_installed"
WANTED="$(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) $ROOT"
# The import runs outside the repository, where only the installed package can answer it.
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANTED" ] || ! (cd / && python -c "import megatron_rpo") 2>/dev/null; then
    echo "[setup] installing megatron_rpo and its test dependencies"
    python -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]"
    echo "$WANTED" > "$STAMP"
fi
