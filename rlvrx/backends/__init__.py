"""Distributed backends: verl (Ray + FSDP2 + vLLM rollouts) for training and RL-Extra, Slurm for
scheduling. verl, Ray and vLLM are imported lazily, so the CPU install never needs them."""
