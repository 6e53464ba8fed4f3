#!/usr/bin/env bash
# Train on one machine: torchrun --standalone, NPROC ranks, resuming from the newest checkpoint.
#
#   NPROC=8 launch/single_node.sh --checkpoint_dir s3://bucket/run1 --log_dir runs/run1
#
# Variables (environment):
#   NPROC        ranks on this machine (default: the number of GPUs, or 1 without GPUs)
#   AUTO_RESUME  1 (default): pass --auto_resume; 0 to start with --resume/--checkpoint_path
#   TORCHRUN     the torchrun command (default: torchrun)
# Every argument is passed on to dcp_train.main (see: python -m dcp_train.main --help).
set -euo pipefail
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$NPROC" -gt 0 ] || NPROC=1
fi
if [ "${AUTO_RESUME:-1}" = 1 ]; then set -- --auto_resume "$@"; fi
# shellcheck disable=SC2086  # TORCHRUN may be a command with arguments
exec ${TORCHRUN:-torchrun} --standalone --nproc_per_node="$NPROC" \
  -m dcp_train.main "$@"
