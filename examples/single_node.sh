#!/usr/bin/env bash
# One node, all its GPUs (or CPU processes): RPO with a recipe from configs/.
#   examples/single_node.sh configs/mistral7b_hh_rpo_paired.yaml [section.key=value ...]
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [overrides...]}; shift
NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count() or 2)")}
exec torchrun --standalone --nproc-per-node="$NPROC" -m megatron_rpo.train --config "$CONFIG" "$@"
