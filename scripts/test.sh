#!/usr/bin/env bash
# Set everything up (virtualenv, torch, the package) and run the test suite on CPU.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/unit/loss -x`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m pytest "$@"
