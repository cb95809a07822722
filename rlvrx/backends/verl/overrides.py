"""A recipe -> Hydra overrides for `python -m verl.trainer.main_ppo` (verl 0.9.x, config `ppo_trainer`).

The mapping follows the names of verl's own config: GRPO is `algorithm.adv_estimator=grpo`, the
clip range is `actor.clip_ratio_low/high`, the KL term is `actor.use_kl_loss` with `low_var_kl`
(the k3 estimator the native trainer uses), rollout.n is the group size. rlvrx's own settings for
the job (run dir, trajectory registration, RL-Extra schedule) travel in a top-level `rlvrx` group
added with `+rlvrx...`, which verl leaves alone.

verl 0.9 reads the reward function from `reward.custom_reward_function.{path,name}`. The old
top-level `custom_reward_function.*` (and `reward_model.*`, `sandbox_fusion.*`) still compose
but `main_ppo` ignores them without a word, so overrides naming them are refused here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlvrx.errors import UsageError

REWARD_MODULE = "pkg://rlvrx.backends.verl.reward"
REWARD_FUNCTION = "compute_score"
CALLBACK_CLASS = "rlvrx.backends.verl.callback.TrajectoryCallback"
GRPO_ENTRY = "verl.trainer.main_ppo"
RL_EXTRA_ENTRY = "rlvrx.backends.verl.rl_extra"
# Legacy top-level reward keys that compose but are silently ignored by verl 0.9's main_ppo.
LEGACY_KEYS = {
    "custom_reward_function": "reward.custom_reward_function",
    "reward_model": "reward.reward_model",
    "sandbox_fusion": "reward.sandbox_fusion",
}

_UNQUOTED = re.compile(r"^[A-Za-z0-9_/+.%@?|-]+$")
_LOOKS_TYPED = re.compile(r"^([-+]?(\d|\.\d|inf|nan)|true$|false$|null$|none$)", re.IGNORECASE)


def hydra_value(value: Any) -> str:
    """A Python value in Hydra's override grammar (strings quoted when they would not parse as-is)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _UNQUOTED.match(text) and not _LOOKS_TYPED.match(text):
        return text
    for quote in ('"', "'"):
        if quote not in text and "\\" not in text:
            return f"{quote}{text}{quote}"
    raise UsageError(f"value {text!r}: cannot be passed as a Hydra override (it holds both quote kinds or a backslash)")


def override_key(item: str) -> str:
    """The dotted key of a Hydra override, without a leading +, ++ or ~."""
    key = item.split("=", 1)[0].strip()
    return key.lstrip("+~")


def check_user_overrides(items: list[str]) -> None:
    """Refuse overrides verl would ignore without a word (the pre-0.9 reward keys)."""
    for item in items:
        if "=" not in item and not item.startswith("~"):
            raise UsageError(f"verl.overrides: {item!r} is not a Hydra override; write KEY=VALUE, e.g. trainer.val_before_train=false")
        key = override_key(item)
        root = key.split(".", 1)[0]
        if root in LEGACY_KEYS:
            rest = key.split(".", 1)[1] if "." in key else ""
            new = LEGACY_KEYS[root] + (f".{rest}" if rest else "")
            raise UsageError(f"verl.overrides: {key!r} is the pre-0.9 key, which verl 0.9 ignores silently; use {new!r}")
        if root == "rlvrx":
            raise UsageError(f"verl.overrides: {key!r}: the rlvrx group is set from the recipe, not by overrides")


@dataclass(frozen=True)
class DataFiles:
    train: Path
    val: Path
    n_train: int
    n_val: int


def run_paths(recipe, run_dir: Path) -> dict[str, Path]:
    from rlvrx.rundir import RunDir

    run = RunDir(Path(run_dir).resolve())
    data_dir = Path(recipe.verl.data_dir).resolve() if recipe.verl.data_dir else run.verl_data
    return {"run_dir": run.root, "data_dir": data_dir, "checkpoints": run.verl_checkpoints, "base_model": run.base_model}


def check_recipe(recipe) -> None:
    """Recipe settings the verl backend cannot honour, all reported at once."""
    problems = []
    if recipe.sft.enabled and recipe.sft.steps > 0:
        problems.append(
            "sft.enabled: the verl backend runs no SFT warm-up; set sft.enabled=false (or warm up with the native backend and point model.path at the result)"
        )
    if recipe.grpo.scale_rewards == "batch":
        problems.append("grpo.scale_rewards=batch: verl's GRPO normalises per group (group) or not at all (none)")
    if recipe.rl_extra is not None:
        rx = recipe.rl_extra
        if rx.fit != "two_point":
            problems.append("rl_extra.fit=lstsq: the verl backend jumps with fit=two_point (anchor cycle_start or window)")
        if recipe.verl.rl_extra_mode == "restart" and rx.optimizer_state != "reset":
            problems.append(
                "rl_extra.optimizer_state: the restart loop starts each cycle with a fresh optimizer; "
                "set rl_extra.optimizer_state=reset or verl.rl_extra_mode=in_process"
            )
    if recipe.grpo.steps < 1:
        problems.append("grpo.steps: the verl backend needs at least one training step")
    try:
        check_user_overrides(list(recipe.verl.overrides))
    except UsageError as exc:
        problems.append(str(exc))
    if problems:
        raise UsageError("; ".join(problems))


def rl_extra_settings(recipe) -> dict:
    rx = recipe.rl_extra
    return {
        "m": rx.m,
        "n": rx.n,
        "iterations": rx.iterations,
        "optimizer_state": rx.optimizer_state,
        "norms": rx.norms,
        "anchor": rx.anchor,
    }


def build_overrides(
    recipe,
    run_dir: Path,
    data: DataFiles,
    model_path: str | Path,
    total_steps: int | None = None,
    checkpoint_dir: Path | None = None,
    step_offset: int = 0,
    effective_offset: int = 0,
    rl_extra: bool | None = None,
    data_seed: int | None = None,
) -> list[str]:
    """Hydra overrides for verl's ppo_trainer; the recipe's `verl.overrides` come last and win.

    total_steps / checkpoint_dir / offsets / data_seed exist for the RL-Extra restart loop, which
    runs one verl job per cycle; rl_extra (default: the recipe has an rl_extra section and
    verl.rl_extra_mode is in_process) adds the in-job schedule.
    """
    check_recipe(recipe)
    g, v = recipe.grpo, recipe.verl
    paths = run_paths(recipe, run_dir)
    if rl_extra is None:
        rl_extra = recipe.rl_extra is not None and v.rl_extra_mode == "in_process"
    if total_steps is None:
        total_steps = recipe.rl_extra.m * recipe.rl_extra.iterations if rl_extra else g.steps
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else paths["checkpoints"]
    fixed_micro = v.micro_batch_size_per_gpu
    a = "actor_rollout_ref."
    items: list[tuple[str, Any]] = [
        # algorithm: GRPO, rewards from the verifier only
        ("algorithm.adv_estimator", "grpo"),
        ("algorithm.use_kl_in_reward", False),
        ("algorithm.norm_adv_by_std_in_grpo", g.scale_rewards == "group"),
        # data
        ("data.train_files", str(data.train)),
        ("data.val_files", str(data.val)),
        ("data.prompt_key", "prompt"),
        ("data.train_batch_size", g.batch_size),
        ("data.max_prompt_length", v.max_prompt_length),
        ("data.max_response_length", g.max_new_tokens),
        ("data.filter_overlong_prompts", True),
        ("data.truncation", "error"),
        ("data.shuffle", True),
        ("data.seed", g.seed if data_seed is None else data_seed),
        # model
        (a + "model.path", str(model_path)),
        (a + "model.use_remove_padding", True),
        (a + "model.enable_gradient_checkpointing", True),
        # actor: FSDP2, optimiser, PPO clip, KL
        (a + "actor.strategy", "fsdp2"),
        (a + "actor.optim.lr", g.lr),
        (a + "actor.optim.lr_warmup_steps", g.warmup_steps if g.warmup_steps > 0 else -1),
        (a + "actor.optim.weight_decay", g.weight_decay),
        (a + "actor.grad_clip", g.max_grad_norm),
        (a + "actor.ppo_mini_batch_size", g.mini_batch_size or g.batch_size),
        (a + "actor.ppo_epochs", g.ppo_epochs),
        (a + "actor.clip_ratio_low", g.epsilon),
        (a + "actor.clip_ratio_high", g.epsilon_high if g.epsilon_high is not None else g.epsilon),
        (a + "actor.loss_agg_mode", g.loss_agg),
        (a + "actor.use_kl_loss", g.beta > 0),
        (a + "actor.kl_loss_coef", g.beta if g.beta > 0 else 0.001),
        (a + "actor.kl_loss_type", "low_var_kl"),
        (a + "actor.entropy_coeff", 0),
        (a + "actor.use_dynamic_bsz", fixed_micro is None),
        (a + "actor.ppo_max_token_len_per_gpu", v.ppo_max_token_len_per_gpu),
        (a + "actor.fsdp_config.param_offload", v.param_offload),
        (a + "actor.fsdp_config.optimizer_offload", v.optimizer_offload),
        (a + "actor.checkpoint.save_contents", list(v.save_contents)),
        (a + "actor.checkpoint.load_contents", [c for c in v.save_contents if c != "hf_model"]),
        (a + "ref.fsdp_config.param_offload", True),
        # rollout: vLLM (or SGLang), group size, sampling
        (a + "rollout.name", v.rollout),
        (a + "rollout.mode", "async"),
        (a + "rollout.n", g.num_generations),
        (a + "rollout.temperature", g.temperature),
        (a + "rollout.top_p", g.top_p),
        (a + "rollout.top_k", g.top_k if g.top_k > 0 else -1),
        (a + "rollout.tensor_model_parallel_size", v.rollout_tp),
        (a + "rollout.gpu_memory_utilization", v.gpu_memory_utilization),
        (a + "rollout.seed", g.seed),
        # reward: the task's verifier
        ("reward.custom_reward_function.path", REWARD_MODULE),
        ("reward.custom_reward_function.name", REWARD_FUNCTION),
        ("reward.reward_manager.name", "naive"),
        # trainer: cluster, schedule, checkpoints
        ("trainer.nnodes", v.nnodes),
        ("trainer.n_gpus_per_node", v.n_gpus_per_node),
        ("trainer.total_training_steps", total_steps),
        ("trainer.total_epochs", 1_000_000),
        ("trainer.save_freq", g.save_every),
        ("trainer.test_freq", g.eval_every if g.eval_every > 0 else -1),
        ("trainer.val_before_train", True),
        ("trainer.default_local_dir", str(checkpoint_dir)),
        ("trainer.resume_mode", "auto"),
        ("trainer.project_name", v.project_name),
        ("trainer.experiment_name", paths["run_dir"].name),
        ("trainer.logger", list(dict.fromkeys([*recipe.logger, *v.logger]))),  # rlvrx's `logger` + verl.logger, console by default
        ("trainer.max_actor_ckpt_to_keep", v.max_ckpt_to_keep),
        ("trainer.checkpoint_callback_class", CALLBACK_CLASS),
    ]
    if fixed_micro is not None:
        items += [
            (a + "actor.ppo_micro_batch_size_per_gpu", fixed_micro),
            (a + "rollout.log_prob_micro_batch_size_per_gpu", fixed_micro),
            (a + "ref.log_prob_micro_batch_size_per_gpu", fixed_micro),
        ]
    out = [f"{k}={hydra_value(val)}" for k, val in items]
    # The one 'module:function' task the reward may import: the recipe's (data files only name tasks).
    out.append(f"+reward.custom_reward_function.reward_kwargs.recipe_task={hydra_value(recipe.task.name)}")
    out.append(f"+rlvrx.run_dir={hydra_value(str(paths['run_dir']))}")
    out.append(f"+rlvrx.step_offset={step_offset}")
    out.append(f"+rlvrx.effective_offset={effective_offset}")
    if rl_extra:
        out.append(f"+rlvrx.rl_extra={hydra_value(rl_extra_settings(recipe))}")
    out += list(v.overrides)
    return out


def total_training_steps(recipe) -> int:
    """verl's trainer.total_training_steps for the recipe's single job: grpo.steps, or m x iterations
    when RL-Extra jumps run inside the job."""
    if recipe.rl_extra is not None and recipe.verl.rl_extra_mode == "in_process":
        return recipe.rl_extra.m * recipe.rl_extra.iterations
    return recipe.grpo.steps


def entry_module(recipe) -> str:
    """`verl.trainer.main_ppo`, or rlvrx's wrapper of it when RL-Extra jumps run inside the job."""
    if recipe.rl_extra is not None and recipe.verl.rl_extra_mode == "in_process":
        return RL_EXTRA_ENTRY
    return GRPO_ENTRY
