"""verl's `trainer.checkpoint_callback_class` hook: every saved step enters the run's trajectory.

verl 0.9 calls `on_save(trainer, global_step, checkpoint_dir)` on the driver after each save. The
callback writes `global_step_N/rlvrx_step.json` (the trajectory step, the gradient step and the
kind) and, when the step dir holds HF weights (save_contents with hf_model), registers them at
once; steps saved without HF weights are converted and registered after the job by
rlvrx.backends.verl.launch.register_run_checkpoints, which reads the same sidecar.
"""

from __future__ import annotations

from verl.trainer.ppo.checkpoint_callback import CheckpointCallback


class TrajectoryCallback(CheckpointCallback):
    def on_save(self, trainer, global_step: int, checkpoint_dir: str, async_save: bool = False, **kwargs) -> None:
        from rlvrx.backends.verl.launch import register_step

        settings = self.config.get("rlvrx") if self.config is not None else None
        if not settings or not settings.get("run_dir"):
            return
        jumps = int(getattr(trainer, "rlvrx_jumps_done", 0))
        n = int(getattr(trainer, "rx_n", 0))
        grad_step = int(settings.get("step_offset", 0)) + int(global_step)
        effective = int(settings.get("effective_offset", 0)) + int(global_step) + jumps * n
        register_step(settings.run_dir, checkpoint_dir, step=effective, grad_step=grad_step, kind="rl", register_now=not async_save)
