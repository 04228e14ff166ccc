"""A run's files: RunPaths, the run folder's names and rules, checkpoints, the object-store mirror, export."""
