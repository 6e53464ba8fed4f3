"""The training run: the loop (loop.py), evaluation, HellaSwag, samples, FLOPs, deterministic mode,
starting from Hugging Face GPT-2 weights (hf_config.py, hf_import.py)."""
