"""Command-line tools: dcp-ckpt (ckpt.py, show.py, export.py), samples, loss plots."""
