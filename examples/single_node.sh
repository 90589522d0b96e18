#!/usr/bin/env bash
# One node, all its GPUs (or CPU processes): RPO with a recipe from configs/.
#   examples/single_node.sh configs/mistral7b_hh_rpo_paired.yaml [section.key=value ...]
# python -m megatron_rpo.launch is torchrun with the preemption exit code: a SIGTERM or Ctrl-C makes the
# workers save and the job exit with 75 (torchrun alone would exit with 1).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [overrides...]}; shift
NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count() or 2)")}
exec python -m megatron_rpo.launch --standalone --nproc-per-node="$NPROC" -m megatron_rpo.train --config "$CONFIG" "$@"
