#!/usr/bin/env bash
# The README's run command: set up .venv and train the tiny model on 2 CPU ranks on the
# embedded default corpus (written to data/default on first use), with checkpoints every 25
# steps, ending with printed samples. Run it again and it resumes from the last checkpoint
# (--auto_resume) and finishes at once. Extra arguments go to dcp_train.main.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh ""  # no extras (without an argument it would get this script's flags)
torchrun --standalone --nproc_per_node=2 -m dcp_train.main --preset tiny --max_steps 100 \
  --keep_last_n_checkpoints 2 --auto_resume \
  --log_dir runs/quickstart/log --checkpoint_dir runs/quickstart/checkpoints "$@"
