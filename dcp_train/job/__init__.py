"""The job's shared services, below checkpoint/ and train/: preemption, orphan watch, one
failure one line, heartbeats, fault points (tests only), metrics (and their wandb copy),
progress bars."""
