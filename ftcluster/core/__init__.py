"""The lowest layer: one-line errors, atomic writes, GPU facts, signals, object storage, data locations, a worker's rank."""
