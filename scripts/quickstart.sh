#!/usr/bin/env bash
# Set everything up (virtualenv, torch, the package) and run the whole pipeline on the bundled
# data on CPU: tokenizer, tiny Llama, conversion, preprocessing, embeddings, warm-up, RPO with
# 2 processes, evaluation, Hugging Face export and one generated reply.
# Arguments go to examples/quickstart.py (e.g. --rpo-steps 40).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python examples/quickstart.py "$@"
