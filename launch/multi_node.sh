#!/usr/bin/env bash
# Train on NNODES machines: run this script once on every node, with the same variables
# except NODE_RANK. The nodes meet at a c10d rendezvous on MASTER_ADDR:MASTER_PORT.
#
#   node 0: NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/multi_node.sh --checkpoint_dir s3://b/r1
#   node 1: NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/multi_node.sh --checkpoint_dir s3://b/r1
#
# Variables (environment):
#   NNODES       number of nodes (required)
#   NODE_RANK    this node's index, 0 .. NNODES-1 (required)
#   MASTER_ADDR  address of node 0, reachable from every node (required)
#   MASTER_PORT  rendezvous port on MASTER_ADDR (default: 29500)
#   NPROC        ranks per node (default: the number of GPUs, or 1 without GPUs)
#   RDZV_ID      job id, the same on every node (default: dcp_train)
#   AUTO_RESUME  1 (default): pass --auto_resume; 0 to start with --resume/--checkpoint_path
#   TORCHRUN     the torchrun command (default: torchrun)
# Every argument is passed on to dcp_train.main. --checkpoint_dir must be storage that every
# node sees (a shared filesystem or an object store); --data_dir must exist on every node.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$NPROC" -gt 0 ] || NPROC=1
fi
if [ "${AUTO_RESUME:-1}" = 1 ]; then set -- --auto_resume "$@"; fi
# shellcheck disable=SC2086
exec ${TORCHRUN:-torchrun} --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" \
  --rdzv_id="${RDZV_ID:-dcp_train}" \
  -m dcp_train.main "$@"
