"""The run around the loop: preemption, orphan watch, fault points, metrics (and their wandb
copy), redaction, progress bars."""
