#!/usr/bin/env bash
# The README's run command: set up .venv and train the tiny model on 2 CPU ranks on the
# embedded default corpus, with checkpoints, ending with printed samples.
# Run it again and it resumes from the last checkpoint (--auto_resume) and finishes at once.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
torchrun --standalone --nproc_per_node=2 -m dcp_train.main --preset tiny \
  --max_steps 200 --warmup_steps 20 --max_lr 3e-3 --batch_size 16 --total_batch_size 2048 \
  --eval_interval 50 --val_steps 4 --hellaswag_interval 0 --generate_interval 100 \
  --checkpoint_interval 50 --keep_last_n_checkpoints 2 --auto_resume \
  --log_dir runs/quickstart/log --checkpoint_dir runs/quickstart/checkpoints "$@"
