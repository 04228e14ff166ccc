"""Online RL with GRPO: sampling groups of completions, scoring them with rewards, the clipped objective."""
