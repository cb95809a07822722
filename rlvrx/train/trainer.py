"""The native (embedded) GRPO trainer: SFT warm-up, then GRPO with checkpoints, metrics and resume.

One run directory holds everything: recipe.yaml, trajectory.json, checkpoints/step_NNNNNN (HF dirs with
trainer_state.pt beside the weights), metrics.jsonl. A rerun of the same recipe resumes from the last
checkpoint and reaches the same weights as an uninterrupted run: the prompts and sampling seed of every
step are derived from (seed, step), and optimizer, scheduler and RNG states are saved with the weights.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rlvrx.checkpoint import Checkpoint, atomic_dir, atomic_write_text, load_torch_file
from rlvrx.config import Recipe, recipe_to_yaml
from rlvrx import models
from rlvrx.errors import RlvrxError, UsageError
from rlvrx.generation import SamplingParams, generate, left_pad, pack_prompt_response
from rlvrx.generation.scoring import shared_prompt_token_logprobs
from rlvrx.generation.sampler import NonFiniteLogits
from rlvrx.locks import run_locked
from rlvrx.models import load_pretrained
from rlvrx.train.grpo import group_advantages, policy_loss, zero_std_fraction
from rlvrx.train.metrics_log import metrics_path, read_metrics
from rlvrx.trajectory import Trajectory, step_dir_name

TRAINER_STATE = "trainer_state.pt"
RECIPE = "recipe.yaml"


def resolve_device(name: str) -> torch.device:
    """The recipe's model.device (errors name that key)."""
    return models.resolve_device(name, "model.device")


def load_model(recipe: Recipe, device: torch.device):
    """(model, tokenizer) from model.path or a freshly built model.tiny."""
    cfg = recipe.model
    dtype = getattr(torch, cfg.dtype)
    if cfg.tiny is not None:
        from rlvrx.tiny import build_tiny_model

        model, tokenizer = build_tiny_model(**cfg.tiny.model_dump())
        return model.to(device=device, dtype=dtype), tokenizer
    return load_pretrained(cfg.path, device, dtype)


def build_task(recipe: Recipe):
    """The recipe's task: the task.* settings it accepts, with a clear error for set ones it does not."""
    from rlvrx.tasks.registry import get_task, task_options

    cfg = recipe.task
    accepted = task_options(cfg.name)
    explicit = {k: v for k, v in cfg.model_dump(exclude_unset=True).items() if k != "name"}
    if accepted is None:
        return get_task(cfg.name, **explicit)
    ignored = sorted(k for k, v in explicit.items() if k not in accepted and v is not None)
    if ignored:
        raise UsageError(f"task.{ignored[0]} does not apply to task {cfg.name!r}; its settings: {', '.join(sorted(accepted))}")
    options = {k: v for k, v in cfg.model_dump().items() if k in accepted}
    return get_task(cfg.name, **options)


def _lr_lambda(warmup: int) -> Callable[[int], float]:
    return lambda i: min(1.0, (i + 1) / warmup) if warmup > 0 else 1.0


@dataclass
class StepBatch:
    """One GRPO step's rollouts, padded: prompts left-aligned to the right edge, responses right-padded.

    input_ids / attention_mask: the packed [B, P + R] rows; prompt_ids / prompt_mask [U, P]: the step's
    unique prompts, left-padded, with prompt_index [B] naming each row's (the log-prob forwards run
    each prompt once for its whole group).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    prompt_index: torch.Tensor


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: str | Path | None = None, force: bool = False, console=None):
        self.recipe = recipe
        self.run_dir = Path(run_dir or recipe.output.dir)
        self.force = force
        self.console = console
        self.device = resolve_device(recipe.model.device)
        self.cfg = recipe.grpo
        self.num_generations = self.cfg.num_generations
        self._check_recipe_shape()

    # -- setup ----------------------------------------------------------------------------------

    def _check_recipe_shape(self) -> None:
        cfg = self.cfg
        if cfg.num_generations < 2:
            raise UsageError("grpo.num_generations must be >= 2: advantages are relative to the group")
        if cfg.mini_batch_size is not None and cfg.batch_size % cfg.mini_batch_size:
            raise UsageError(
                f"grpo.batch_size ({cfg.batch_size}) is not divisible by grpo.mini_batch_size ({cfg.mini_batch_size})"
            )

    def _check_run_dir(self) -> str:
        """The recipe's YAML; refuse a run dir that holds a different recipe (unless force)."""
        saved = self.run_dir / RECIPE
        text = recipe_to_yaml(self.recipe)
        if saved.is_file() and not self.force:
            try:
                same = saved.read_bytes() == text.encode()
            except OSError as exc:
                raise UsageError(f"{saved}: cannot read: {exc.strerror or exc}") from None
            if not same:
                raise UsageError(
                    f"{self.run_dir} holds a different recipe ({saved}); use another output.dir, or pass --force to continue with this one"
                )
        return text

    def setup(self) -> None:
        """Check and load everything the recipe names; recipe.yaml is written only once all of it
        loaded, so a recipe that fails here leaves nothing that would refuse the corrected rerun."""
        recipe_text = self._check_run_dir()
        torch.manual_seed(self.cfg.seed)
        self.trajectory = Trajectory.load(self.run_dir, create=True)
        self.model, self.tokenizer = load_model(self.recipe, self.device)
        self.task = build_task(self.recipe)
        self.train_examples = list(self.task.train_examples())
        self.test_examples = list(self.task.test_examples())
        if not self.train_examples:
            raise UsageError(f"task {self.recipe.task.name!r} yields no training prompts; check task settings (n_train, data, limit)")
        atomic_write_text(self.run_dir / RECIPE, recipe_text)
        self.ref_model = None
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.999)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.cfg.warmup_steps))
        self.step = 0
        self.grad_step = 0
        self.elapsed = 0.0
        self.eval_seconds = 0.0
        self._pool = None

    # -- checkpoints ----------------------------------------------------------------------------

    def checkpoint_dir(self, step: int) -> Path:
        return self.run_dir / "checkpoints" / step_dir_name(step)

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "grad_step": self.grad_step,
            "elapsed": self.elapsed,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def save(self, kind: str = "rl", extra_state: dict | None = None) -> Path:
        """Write the live model (and trainer state) as checkpoints/step_N, atomically, and register it."""
        out = self.checkpoint_dir(self.step)
        with atomic_dir(out, overwrite=True) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            torch.save({**self.trainer_state(), **(extra_state or {})}, tmp / TRAINER_STATE)
        self.trajectory.add(self.step, out, kind=kind, replace=True, grad_step=self.grad_step)
        self.trajectory.save()
        return out

    def latest_checkpoint(self) -> Path | None:
        """The newest registered checkpoint that carries trainer state (where a rerun resumes)."""
        for entry in reversed(self.trajectory.entries):
            path = self.trajectory.resolve(entry)
            if (path / TRAINER_STATE).is_file():
                return path
        return None

    def restore(self, path: Path) -> dict:
        with Checkpoint(path) as ckpt:  # its headers checked: a damaged file is one line naming it
            state_dict = {name: ckpt.get(name).to(self.device) for name in ckpt.names()}
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and self.model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise RlvrxError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        if self.model.config.tie_word_embeddings:
            self.model.tie_weights()
        state = load_torch_file(path / TRAINER_STATE, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.grad_step = int(state["grad_step"])
        self.elapsed = float(state.get("elapsed", 0.0))
        return state

    # -- metrics --------------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return metrics_path(self.run_dir)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines past the resumed step (they are recomputed), and a torn last line."""
        if not self.metrics_path.is_file():
            return
        keep = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= after_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- evaluation -----------------------------------------------------------------------------

    def greedy_accuracy(self, examples=None, limit: int | None = None) -> float:
        """Greedy accuracy on the test split (its time is kept out of the training wall time)."""
        t0 = time.perf_counter()
        examples = list(self.test_examples if examples is None else examples)[: limit or self.cfg.eval_examples]
        if not examples:
            return float("nan")
        prompts = [self.task.encode_prompt(ex, self.tokenizer) for ex in examples]
        params = SamplingParams(temperature=0.0, max_new_tokens=self.cfg.max_new_tokens, seed=0)
        gens = generate(self.model, self.tokenizer, prompts, n=1, params=params, batch_size=256)
        accuracy = float(np.mean(self.task.rewards([g.text for g in gens], examples, pool=self.grading_pool())))
        self.eval_seconds += time.perf_counter() - t0
        return accuracy

    def grading_pool(self):
        """Worker processes with a hard per-answer timeout for math grading; None for cheap verifiers."""
        if self.task.grading_kind != "math":
            return None
        if self._pool is None:
            from rlvrx.eval.grading import GradingPool

            self._pool = GradingPool()
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # -- SFT warm-up ----------------------------------------------------------------------------

    def sft(self, progress=None) -> list[dict]:
        from rlvrx.train.sft import run_sft

        return run_sft(self, progress=progress)

    # -- GRPO -----------------------------------------------------------------------------------

    def step_examples(self, step: int) -> list:
        rng = np.random.default_rng([self.cfg.seed, step])
        n = len(self.train_examples)
        idx = rng.choice(n, size=self.cfg.batch_size, replace=self.cfg.batch_size > n)
        return [self.train_examples[i] for i in idx]

    def rollout(self, step: int) -> tuple[StepBatch, dict]:
        examples = self.step_examples(step)
        prompts = [self.task.encode_prompt(ex, self.tokenizer) for ex in examples]
        params = SamplingParams(
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            top_k=self.cfg.top_k,
            max_new_tokens=self.cfg.max_new_tokens,
            seed=self.cfg.seed * 1_000_003 + step,
        )
        gens = generate(self.model, self.tokenizer, prompts, n=self.num_generations, params=params)
        rewards = torch.tensor(
            self.task.rewards([g.text for g in gens], [examples[g.prompt_index] for g in gens], pool=self.grading_pool()),
            dtype=torch.float32,
        )
        advantages = group_advantages(rewards, self.num_generations, self.cfg.scale_rewards)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        packed = pack_prompt_response([g.prompt_ids for g in gens], [g.token_ids for g in gens], pad_id=pad, device=self.device)
        resp = packed.response_mask.to(torch.float32)
        lengths = resp.sum(1)
        stats = {
            "reward_mean": float(rewards.mean()),
            "accuracy": float((rewards >= 1.0).float().mean()),
            "reward_std": float(rewards.std()),
            "advantage_std": float(advantages.std()),
            "frac_zero_std": zero_std_fraction(rewards, self.num_generations),
            "response_length": float(lengths.mean()),
        }
        prompt_ids, prompt_mask = left_pad(prompts, pad, self.device)
        prompt_index = torch.tensor([g.prompt_index for g in gens], dtype=torch.long, device=self.device)
        batch = StepBatch(
            packed.input_ids, packed.attention_mask, resp, rewards, advantages.to(self.device),
            prompt_ids, prompt_mask, prompt_index,
        )
        return batch, stats

    def _logprobs(self, model, batch: StepBatch, rows=slice(None), with_entropy=False):
        """Per-token log-probs of the responses of `rows` [rows, R]; each prompt runs once per call."""
        used, row_prompt = torch.unique(batch.prompt_index[rows], return_inverse=True)
        width = batch.response_mask.shape[1]
        return shared_prompt_token_logprobs(
            model,
            batch.prompt_ids[used],
            batch.prompt_mask[used],
            row_prompt,
            batch.input_ids[rows][:, -width:],
            batch.response_mask[rows],
            temperature=self.cfg.temperature,
            with_entropy=with_entropy,
        )

    def grpo_step(self) -> dict:
        """One GRPO step at self.step: rollout, then ppo_epochs x mini-batches of clipped updates."""
        t0 = time.perf_counter()
        cfg = self.cfg
        batch, stats = self.rollout(self.grad_step)
        n_rows = batch.input_ids.shape[0]
        mini = (cfg.mini_batch_size or cfg.batch_size) * self.num_generations
        # Fully on-policy (one update per rollout): the old policy is the current one, detached; no extra forward.
        on_policy = cfg.ppo_epochs == 1 and mini >= n_rows
        with torch.no_grad():
            old_logprobs = None if on_policy else self._logprobs(self.model, batch)[0]
            ref_logprobs = self._logprobs(self.ref_model, batch)[0] if self.ref_model is not None else None
        losses, kls, entropies, grad_norms, clip_fracs = [], [], [], [], []
        self.model.train()
        for _ in range(cfg.ppo_epochs):
            for start in range(0, n_rows, mini):
                rows = slice(start, start + mini)
                logprobs, entropy = self._logprobs(self.model, batch, rows, with_entropy=True)
                loss, lstats = policy_loss(
                    logprobs,
                    logprobs.detach() if on_policy else old_logprobs[rows],
                    batch.advantages[rows],
                    batch.response_mask[rows],
                    epsilon=cfg.epsilon,
                    epsilon_high=cfg.epsilon_high,
                    loss_agg=cfg.loss_agg,
                    ref_logprobs=None if ref_logprobs is None else ref_logprobs[rows],
                    beta=cfg.beta,
                )
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(self.step)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                if not torch.isfinite(grad_norm):
                    raise NonFiniteLoss(self.step)
                self.optimizer.step()
                self.scheduler.step()
                mask = batch.response_mask[rows]
                losses.append(lstats.loss)
                kls.append(lstats.kl)
                clip_fracs.append(lstats.clip_fraction)
                entropies.append(float((entropy * mask).sum() / mask.sum().clamp(min=1)))
                grad_norms.append(float(grad_norm))
        self.model.eval()
        self.step += 1
        self.grad_step += 1
        return {
            "step": self.step,
            "grad_step": self.grad_step,
            **stats,
            "loss": float(np.mean(losses)),
            "kl": float(np.mean(kls)),
            "clip_fraction": float(np.mean(clip_fracs)),
            "entropy": float(np.mean(entropies)),
            "grad_norm": float(np.mean(grad_norms)),
            "lr": self.scheduler.get_last_lr()[0],
            "step_time": time.perf_counter() - t0,
        }


    # -- the loop -------------------------------------------------------------------------------

    def total_grad_steps(self) -> int:
        return self.cfg.steps

    def should_save(self) -> bool:
        return self.grad_step % self.cfg.save_every == 0 or self.grad_step == self.total_grad_steps()

    def should_eval(self) -> bool:
        every = self.cfg.eval_every
        return self.grad_step == self.total_grad_steps() or bool(every and self.grad_step % every == 0)

    def on_start(self, resumed_state: dict | None) -> None:
        """Hook: called once before the first GRPO step (after a resume, with the saved trainer state)."""

    def after_step(self, record: dict) -> None:
        """Hook: called after each GRPO step is logged, before the step's checkpoint is saved."""

    def fit(self, show_progress: bool = True) -> dict:
        """Resume from the last checkpoint, or SFT + save step 0; then GRPO steps until the budget is spent.
        The run directory is this process's alone meanwhile: a second trainer is refused at once."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UsageError(f"output.dir {self.run_dir} is a file, not a run directory")
        with run_locked(self.run_dir):
            self.setup()
            try:
                return self._fit(show_progress)
            finally:
                self.close()

    def _fit(self, show_progress: bool) -> dict:
        from rlvrx.train.progress import TrainProgress

        t_start = time.perf_counter()
        summary: dict = {"run_dir": str(self.run_dir), "resumed_from": None}
        with TrainProgress(enabled=show_progress) as progress:
            latest = self.latest_checkpoint()
            state = None
            if latest is not None:
                state = self.restore(latest)
                self.truncate_metrics(self.step)
                summary["resumed_from"] = self.step
            else:
                if self.metrics_path.exists():
                    self.metrics_path.unlink()
                if self.recipe.sft.enabled and self.recipe.sft.steps > 0:
                    progress.start("SFT warm-up", self.recipe.sft.steps)
                    self.sft(progress=progress.sft_update)
                self.log({"stage": "grpo", "step": 0, "grad_step": 0, "elapsed": 0.0, "test_accuracy": self.greedy_accuracy()})
                self.save()
            if self.cfg.beta > 0:
                self.ref_model = load_pretrained(self.checkpoint_dir(0), self.device, self.model.dtype)[0].eval()
            self.on_start(state)
            progress.start(self.progress_label, self.total_grad_steps(), completed=self.grad_step)
            self.eval_seconds = 0.0
            clock = time.perf_counter()

            def tick():
                # training wall time: everything but greedy evaluation
                nonlocal clock
                now = time.perf_counter()
                self.elapsed += now - clock - self.eval_seconds
                self.eval_seconds = 0.0
                clock = now

            while self.grad_step < self.total_grad_steps():
                try:
                    record = self.grpo_step()
                except (NonFiniteLoss, NonFiniteLogits) as exc:
                    raise RlvrxError(
                        f"{exc}; training stopped, the last good checkpoint {self.latest_checkpoint()} is kept "
                        "(lower grpo.lr or grpo.max_grad_norm)"
                    ) from None
                record["stage"] = "grpo"
                if self.should_eval():
                    record["test_accuracy"] = self.greedy_accuracy()
                tick()
                record["elapsed"] = self.elapsed
                self.log(record)
                self.after_step(record)
                if self.should_save():
                    self.save()
                tick()
                progress.grpo_update(record)
        summary.update(self.summary())
        summary["wall_time_s"] = time.perf_counter() - t_start
        return summary

    progress_label = "GRPO"

    def records(self) -> list[dict]:
        return read_metrics(self.run_dir)

    def summary(self) -> dict:
        records = self.records()
        grpo = [r for r in records if r.get("stage") == "grpo" and "reward_mean" in r]
        evals = [r for r in records if "test_accuracy" in r]
        return {
            "steps": self.step,
            "grad_steps": self.grad_step,
            "checkpoints": len(self.trajectory),
            "test_accuracy_start": evals[0]["test_accuracy"] if evals else None,
            "test_accuracy_end": evals[-1]["test_accuracy"] if evals else None,
            "reward_first": grpo[0]["reward_mean"] if grpo else None,
            "reward_last": float(np.mean([r["reward_mean"] for r in grpo[-5:]])) if grpo else None,
            "train_time_s": self.elapsed,
        }


class NonFiniteLoss(RlvrxError):
    def __init__(self, step: int):
        self.step = step
        super().__init__(f"non-finite loss or gradient at step {step}")



def train(recipe: Recipe, run_dir: str | Path | None = None, force: bool = False, show_progress: bool = True) -> dict:
    """Run (or resume) SFT + GRPO as the recipe says; return a summary."""
    return Trainer(recipe, run_dir, force=force).fit(show_progress=show_progress)
