"""Checkpoints: the manager and its components, the directory view, the save protocol, restore,
the resume rules; io/ (storage and files), async_save/ (the save process), tiers/ (local tier)."""
