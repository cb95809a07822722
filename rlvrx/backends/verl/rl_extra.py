"""RL-Extra inside one verl job: `python -m rlvrx.backends.verl.rl_extra HYDRA_OVERRIDES...`.

verl 0.9's v1 sync trainer runs each step as rollout -> reward -> update_actor -> [save] ->
on_step_end, and on_step_end pushes the actor's weights to the (sleeping) rollout engine. The
trainer subclass here jumps in on_step_end every m steps, *before* that push, so the next rollouts
already sample from the extrapolated policy:

  anchor W_a: snapshotted on every rank (its local FSDP2 shards, on CPU) at the start of a cycle
              (anchor=window: once, the initial model)
  after m steps, W_b: the pre-jump state is saved (kind rl), then each rank replaces its local
              shards with W_a + alpha (W_b - W_a), alpha = (m+n)/m (window: (S+n)/S, S = effective
              steps so far) (rlvrx.backends.verl.jump; elementwise, so shard-local: no gather)
  then:       the optimizer policy (keep / reset / rescale, as the native trainer), the post-jump
              state saved to DEFAULT_LOCAL_DIR/rl_extra/jump_K/actor and registered in the run's
              trajectory as kind "extrapolated" (effective step = gradient steps + K n), and
              snapshotted as the next cycle's anchor.

The worker methods are verl `@register(dispatch_mode=Dispatch.ONE_TO_ALL)` methods on a subclass of
verl's ActorRolloutRefWorker; the trainer swaps that subclass into its role -> worker mapping.

Resume: the saved jump states let a restarted job rebuild the anchor of the cycle it stopped in
(see RLExtraTrainer._load_checkpoint); a job stopped between a cycle's last save and its jump
redoes the jump. The schedule comes from the `+rlvrx.rl_extra={m,n,iterations,...}` group that
rlvrx.backends.verl.overrides adds.
"""

from __future__ import annotations

import json
import logging
import os

import ray
from verl.single_controller.base.decorator import Dispatch, register
from verl.trainer.main_ppo import TaskRunnerV1
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.workers.engine_workers import ActorRolloutRefWorker

from rlvrx.backends.verl.jump import apply_jump_local, jump_factor, snapshot_local
from rlvrx.backends.verl.launch import JUMP_MARKER, JUMPS_DIR

logger = logging.getLogger(__name__)

JUMP_DIR = JUMPS_DIR


def apply_optimizer_policy(optimizer, policy: str) -> None:
    """The native trainer's policies: keep; reset (state cleared, a fresh AdamW); rescale (first
    moment zeroed, second moment and step kept). FSDP2 optimizer states are DTensors; both are rank-local."""
    if optimizer is None or policy == "keep":
        return
    if policy == "reset":
        optimizer.state.clear()
    elif policy == "rescale":
        for state in optimizer.state.values():
            if "exp_avg" in state:
                state["exp_avg"].zero_()
    else:
        raise ValueError(f"optimizer_state {policy!r}: use keep, reset or rescale")


class RLExtraWorker(ActorRolloutRefWorker):
    """verl's hybrid actor/rollout worker plus the two RL-Extra operations on its local shards."""

    def _fsdp_module(self):
        module = getattr(getattr(self.actor, "engine", None), "module", None)
        if module is None:
            raise RuntimeError("RL-Extra jumps need verl's FSDP engine (actor_rollout_ref.actor.strategy=fsdp2)")
        return module

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def rlvrx_snapshot_anchor(self) -> int:
        """Copy this rank's local parameter shards to CPU as the anchor W_a; returns the element count."""
        self._rlvrx_anchor = snapshot_local(self._fsdp_module())
        return sum(t.numel() for t in self._rlvrx_anchor.values())

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def rlvrx_jump(self, factor: float, norms: str = "copy", optimizer_state: str = "keep", reanchor: bool = True) -> dict:
        """W <- W_a + factor (W - W_a) on the local shards, then the optimizer policy; the result
        becomes the next anchor when `reanchor` (anchor=cycle_start), else W_a stays (anchor=window)."""
        anchor = getattr(self, "_rlvrx_anchor", None)
        if anchor is None:
            raise RuntimeError("rlvrx_jump called before rlvrx_snapshot_anchor")
        module = self._fsdp_module()
        stats = apply_jump_local(module, anchor, factor, norms)
        apply_optimizer_policy(getattr(self.actor.engine, "optimizer", None), optimizer_state)
        if reanchor:
            self._rlvrx_anchor = snapshot_local(module)
        return stats


class RLExtraTrainer(PPOTrainerSync):
    """verl's synchronous PPO trainer with a jump every m steps, before the weights reach the rollout."""

    def __init__(self, config):
        super().__init__(config)
        self._read_schedule(config)

    def _read_schedule(self, config) -> None:
        settings = config.rlvrx.rl_extra
        self.rx_m = int(settings.m)
        self.rx_n = int(settings.n)
        self.rx_iterations = int(settings.iterations)
        self.rx_norms = str(settings.get("norms", "copy"))
        self.rx_optimizer_state = str(settings.get("optimizer_state", "keep"))
        self.rx_anchor = str(settings.get("anchor", "cycle_start"))
        self.rlvrx_jumps_done = 0

    def jump_factor(self, k: int) -> float:
        """alpha of jump k: (m+n)/m from the cycle start, or (S+n)/S from step 0 (anchor=window),
        S = the effective steps before the jump."""
        if self.rx_anchor == "window":
            span = k * self.rx_m + (k - 1) * self.rx_n
            return (span + self.rx_n) / span
        return jump_factor(self.rx_m, self.rx_n)

    # -- workers ----------------------------------------------------------------------------------

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        for role in list(self.role_worker_mapping):
            if role != Role.Critic:
                self.role_worker_mapping[role] = ray.remote(RLExtraWorker)

    # -- paths ------------------------------------------------------------------------------------

    def _jump_dir(self, k: int) -> str:
        return os.path.join(self.config.trainer.default_local_dir, JUMP_DIR, f"jump_{k:04d}")

    def _jump_saved(self, k: int) -> bool:
        return os.path.isfile(os.path.join(self._jump_dir(k), JUMP_MARKER))

    def _load_actor(self, step_dir: str) -> None:
        self.actor_rollout_wg.load_checkpoint(local_path=os.path.join(step_dir, "actor"), del_local_after_load=False)

    def _resumed_step_dir(self) -> str:
        if self.config.trainer.resume_mode == "resume_path":
            return str(self.config.trainer.resume_from_path)
        return os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")

    # -- schedule ---------------------------------------------------------------------------------

    def _load_checkpoint(self):
        self.actor_rollout_wg.rlvrx_snapshot_anchor()  # cycle 1's anchor: the initial model
        super()._load_checkpoint()
        step = self.global_steps
        if step == 0:
            return
        k, r = divmod(step, self.rx_m)
        window = self.rx_anchor == "window"  # the anchor is the initial model for good
        if r == 0 and self._jump_saved(k):
            self._load_actor(self._jump_dir(k))
            if not window:
                self.actor_rollout_wg.rlvrx_snapshot_anchor()
            self.rlvrx_jumps_done = k
            return
        start = k if r else k - 1  # the jump whose result anchors the cycle this step belongs to
        if start >= 1 and not window:
            if not self._jump_saved(start):
                raise RuntimeError(f"cannot resume RL-Extra at step {step}: the anchor of its cycle, {self._jump_dir(start)}, is missing or incomplete")
            step_dir = self._resumed_step_dir()
            self._load_actor(self._jump_dir(start))
            self.actor_rollout_wg.rlvrx_snapshot_anchor()
            self._load_actor(step_dir)
        self.rlvrx_jumps_done = start
        if r == 0:
            self._jump()  # the previous job stopped between this cycle's last save and its jump

    def on_step_end(self):
        if self.global_steps % self.rx_m == 0 and self.rlvrx_jumps_done < self.global_steps // self.rx_m:
            if not self._saved_this_step():
                self._save_checkpoint()  # the pre-jump state W_b always enters the trajectory (kind rl)
            self._jump()
        super().on_step_end()

    def _saved_this_step(self) -> bool:
        freq = self.config.trainer.save_freq
        last = self.global_steps >= self.total_training_steps
        return freq > 0 and (last or self.global_steps % freq == 0)

    def _jump(self) -> None:
        from rlvrx.backends.verl.launch import register_step

        k = self.rlvrx_jumps_done + 1
        factor = self.jump_factor(k)
        stats = self.actor_rollout_wg.rlvrx_jump(factor, self.rx_norms, self.rx_optimizer_state, self.rx_anchor != "window")
        self.rlvrx_jumps_done = k
        grad_step = int(self.config.rlvrx.get("step_offset", 0)) + self.global_steps
        effective = int(self.config.rlvrx.get("effective_offset", 0)) + self.global_steps + k * self.rx_n
        path = self._jump_dir(k)
        self.actor_rollout_wg.save_checkpoint(os.path.join(path, "actor"), None, self.global_steps, None)
        info = {
            "jump": k,
            "grad_step": grad_step,
            "effective_step": effective,
            "factor": factor,
            "anchor": self.rx_anchor,
            "norms": self.rx_norms,
            "optimizer_state": self.rx_optimizer_state,
            "max_abs_change": max(s["max_abs_change"] for s in stats),
        }
        with open(os.path.join(path, JUMP_MARKER), "w") as f:
            json.dump(info, f, indent=2)
        register_step(self.config.rlvrx.run_dir, path, step=effective, grad_step=grad_step, kind="extrapolated")
        pending = getattr(self, "_pending_sync_metrics", None) or {}
        self._pending_sync_metrics = {
            **pending,
            "rlvrx/jumps": k,
            "rlvrx/effective_step": effective,
            "rlvrx/jump_max_abs_change": info["max_abs_change"],
        }
        logger.info("RL-Extra jump %d at gradient step %d -> effective step %d", k, grad_step, effective)


class _RLExtraTaskRunner(TaskRunnerV1.__ray_actor_class__):
    """verl's TaskRunnerV1, running RLExtraTrainer where it would run the sync trainer.

    TaskRunnerV1.run picks its trainer from verl's registry by trainer.v1.trainer_mode. The mode
    stays "sync" (verl keys its replay buffer and resume logic on that name), and this runner's own
    Ray actor process maps "sync" to the subclass.
    """

    def run(self, config):
        from verl.trainer.ppo.v1 import trainer_base

        trainer_base.TRAINER_REGISTRY["sync"] = RLExtraTrainer
        return super().run(config)


RLExtraTaskRunner = ray.remote(_RLExtraTaskRunner)


def _main(config) -> None:
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    settings = config.get("rlvrx", {}).get("rl_extra") if config.get("rlvrx") else None
    if settings is None:
        raise SystemExit("rlvrx.backends.verl.rl_extra needs the +rlvrx.rl_extra={m,n,iterations,...} group")
    if config.trainer.v1.trainer_mode != "sync":
        raise SystemExit("RL-Extra runs on verl's synchronous trainer (trainer.v1.trainer_mode=sync)")
    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    run_ppo(config, task_runner_class=RLExtraTaskRunner)


def main() -> None:
    import hydra
    import verl.trainer.main_ppo as verl_main

    config_dir = os.path.join(os.path.dirname(verl_main.__file__), "config")
    hydra.main(config_path=config_dir, config_name="ppo_trainer", version_base=None)(_main)()


if __name__ == "__main__":
    main()
