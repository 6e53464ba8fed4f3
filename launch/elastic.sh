#!/usr/bin/env bash
# Fault-tolerant, elastic training: torchrun restarts the workers (up to MAX_RESTARTS times)
# when one fails or a node joins or leaves, with MIN_NODES..MAX_NODES nodes; every (re)start
# resumes from the newest committed checkpoint (--auto_resume, always), also on another
# world size. Run it on every node with the same variables.
#
#   MIN_NODES=1 MAX_NODES=4 RDZV_ENDPOINT=10.0.0.1:29400 launch/elastic.sh --checkpoint_dir s3://b/r1
#
# Variables (environment):
#   MIN_NODES      fewest nodes to train with (default: 1)
#   MAX_NODES      most nodes (default: MIN_NODES)
#   NPROC          ranks per node (default: the number of GPUs, or 1 without GPUs)
#   MAX_RESTARTS   worker-group restarts before giving up (default: 3)
#   RDZV_ENDPOINT  host:port of the c10d rendezvous, the same on every node (default:
#                  127.0.0.1:29400, one node only)
#   RDZV_ID        job id, the same on every node (default: dcp_train)
#   TORCHRUN       the torchrun command (default: torchrun)
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE  1 (default here): see below
# Every argument is passed on to dcp_train.main. Choose --total_batch_size divisible by
# batch_size * seq_len * every world size the job may run at.
set -euo pipefail
MIN_NODES=${MIN_NODES:-1}
# torchrun's own restarts of the workers work under torch's defaults (dcp_train gives each attempt
# its own prefix in the store torch 2.13 shares with the workers). A node whose *agent* is
# relaunched under c10d rendezvous does not: the surviving leader agent never publishes its
# shared store's address to the new round and both agents time out in torch's rendezvous.
# Without the sharing (1, the default here) rank 0 of each attempt hosts a fresh store, which
# avoids it; harmless otherwise (docs/launch.md).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$NPROC" -gt 0 ] || NPROC=1
fi
# shellcheck disable=SC2086
exec ${TORCHRUN:-torchrun} --nnodes="$MIN_NODES:${MAX_NODES:-$MIN_NODES}" \
  --nproc_per_node="$NPROC" --max-restarts="${MAX_RESTARTS:-3}" \
  --rdzv_backend=c10d --rdzv_endpoint="${RDZV_ENDPOINT:-127.0.0.1:29400}" \
  --rdzv_id="${RDZV_ID:-dcp_train}" \
  -m dcp_train.main --auto_resume "$@"
