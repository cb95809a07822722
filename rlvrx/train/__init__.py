"""Native GRPO training (SFT warm-up, GRPO, RL-Extra)."""
