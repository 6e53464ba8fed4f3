"""The training run: the loop (loop.py), evaluation, HellaSwag, samples, FLOPs, deterministic mode."""
