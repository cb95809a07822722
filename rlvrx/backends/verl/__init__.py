"""backend: verl. A recipe becomes Hydra overrides for `python -m verl.trainer.main_ppo` (overrides),
the task becomes verl parquet files (data) graded by the same verifiers (reward), checkpoints are
registered in the run's trajectory (callback, launch) and converted to HF safetensors (convert).
RL-Extra jumps run inside the verl job on each rank's FSDP2 shards (rl_extra, jump).

Only `overrides`, `data`, `reward`, `jump`, `launch` and `convert`'s entry points import without
verl installed; `rl_extra` and `callback` run inside a verl job.
"""
