"""Launching the loop: in this process, or under Ray Train on loopback or a cluster; GRPO's rollout actors."""
