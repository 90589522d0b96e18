#!/usr/bin/env bash
# Set everything up (virtualenv, torch, the package) and run the test suite on CPU.
# With no arguments, every tier (as CI runs it). Extra arguments go to pytest, e.g.
# `bash scripts/test.sh tests/unit/loss -x`, or one tier: `-m unit`, `-m dist`, `-m e2e`, `-m gpu`
# (docs/cpu.md, "The tests, by tier").
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m pytest "$@"
