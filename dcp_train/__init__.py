"""dcp_train: GPT-2 pre-training with FSDP2 and crash-proof sharded DCP checkpoints."""

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)
