"""Held-out evaluation: loss and classification metrics, generation, choice scoring, forgetting, the harness, the suite."""
