"""The per-worker training loop and its parts (set-up, steppers, optimizer, packing, health, progress, summary)."""
