#!/usr/bin/env bash
# Several nodes with torchrun: run this on every node with the same MASTER_ADDR/MASTER_PORT/NNODES
# and each node's NODE_RANK (0 .. NNODES-1). Checkpoints and datasets must be on a shared filesystem.
#   MASTER_ADDR=node0 MASTER_PORT=29500 NNODES=8 NODE_RANK=$i \
#     examples/multi_node.sh configs/llama2_70b_rpo_tp8_pp4.yaml
# python -m megatron_rpo.launch is torchrun with the preemption exit code: a SIGTERM or Ctrl-C makes the
# workers save and the job exit with 75 (torchrun alone would exit with 1).
set -euo pipefail
CONFIG=${1:?usage: $0 CONFIG [overrides...]}; shift
: "${MASTER_ADDR:?set MASTER_ADDR to the first node's address}"
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}"
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
exec python -m megatron_rpo.launch --nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$GPUS_PER_NODE" \
    --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
    -m megatron_rpo.train --config "$CONFIG" "$@"
