"""The training engine: the per-worker loop and its parts (optimizer, checkpoints, metrics)."""
