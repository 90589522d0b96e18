#!/usr/bin/env bash
# The tests that touch megatron-core, at the other end of the supported range (docs/versions.md),
# in a virtualenv of their own. CI runs it after the README's test command (which tests 0.16.1).
#
#   MEGATRON_CORE_VERSION  the release to test (default 0.19.2, the newest supported)
#   MEGATRON_RPO_VENV      its virtualenv (default: .venv-megatron-VERSION in the repository)
#   Extra arguments go to pytest instead of the default selection below.
#
# megatron-core 0.17 and later declare Python >= 3.12 but build on 3.11 from their sources: the
# release is built from its sdist, without its declared dependencies (torch is ours, installed
# first; numpy, packaging and pybind11 are installed before the build). From 0.18 megatron-core
# imports triton, which the CPU build of torch does not bring: it is installed on its own.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VERSION="${MEGATRON_CORE_VERSION:-0.19.2}"
export MEGATRON_RPO_VENV="${MEGATRON_RPO_VENV:-$ROOT/.venv-megatron-$VERSION}"
# The first environment, for the test that writes a checkpoint under one release and resumes it
# under the other (tests/functional/test_megatron_versions.py).
FIRST_PYTHON="$ROOT/.venv/bin/python"

if [ ! -x "$MEGATRON_RPO_VENV/bin/python" ]; then
    echo "[setup] creating virtualenv $MEGATRON_RPO_VENV"
    "${PYTHON:-python3}" -m venv "$MEGATRON_RPO_VENV"
fi
PIP=("$MEGATRON_RPO_VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$MEGATRON_RPO_VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] installing ${TORCH_SPEC:-torch==2.13.0} first"
    "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi
installed="$("$MEGATRON_RPO_VENV/bin/python" -c \
    "import importlib.metadata as m; print(m.version('megatron-core'))" 2>/dev/null || true)"
if [ "$installed" != "$VERSION" ]; then
    echo "[setup] building megatron-core $VERSION from its sources"
    "${PIP[@]}" numpy packaging pybind11 setuptools wheel
    "${PIP[@]}" --ignore-requires-python --no-deps --no-binary megatron-core "megatron-core==$VERSION"
fi
if ! "$MEGATRON_RPO_VENV/bin/python" -c "import triton" 2>/dev/null \
        && "$MEGATRON_RPO_VENV/bin/python" -c "import sys, importlib.metadata as m
sys.exit(0 if tuple(int(x) for x in m.version('megatron-core').split('.')[:2]) >= (0, 18) else 1)"; then
    echo "[setup] installing triton (megatron-core $VERSION imports it)"
    "${PIP[@]}" --no-deps triton
fi
# Our package and its test dependencies, as env.sh installs them; pip keeps the megatron-core above
# (it is within setup.py's range).
# shellcheck disable=SC1091
. "$ROOT/scripts/env.sh"
cd "$ROOT"
python -c "import importlib.metadata as m, sys; v = m.version('megatron-core'); sys.exit(0 if v == '$VERSION' else
    f'megatron-core {v} is installed in $MEGATRON_RPO_VENV, not $VERSION')"

if [ -x "$FIRST_PYTHON" ]; then
    export MEGATRON_RPO_OTHER_PYTHON="$FIRST_PYTHON"
fi
if [ $# -eq 0 ]; then
    # Everything in the pytest process or in gloo ranks (models, steps, checkpoints, the optimizer,
    # experts, context parallelism, conversion, the equivalence harness), every shipped recipe, and
    # checkpoints across the two releases.
    set -- tests/unit tests/functional/test_equivalence.py tests/functional/test_experts.py \
        tests/functional/test_interleaved.py tests/functional/test_context_parallel.py tests/functional/test_train.py \
        tests/functional/test_recipe_runs.py tests/functional/test_megatron_versions.py
fi
exec python -m pytest "$@"
