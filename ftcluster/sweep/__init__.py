"""Hyperparameter sweeps with Ray Tune: search spaces, searchers, trials and the leaderboard."""
