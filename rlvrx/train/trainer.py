"""The native (embedded) GRPO trainer: SFT warm-up, then GRPO with checkpoints, metrics and resume.

One run directory (rlvrx.rundir) holds everything: the recipe, the trajectory, the checkpoints (HF dirs
with the trainer state beside the weights, rlvrx.train.state) and the metrics log. A rerun of the same
recipe resumes from the last checkpoint and reaches the same weights as an uninterrupted run: the prompts
and sampling seed of every step are derived from (seed, step) (rlvrx.train.rollout), and optimizer,
scheduler and RNG states are saved with the weights. Progress is reported to a `TrainingProgress` the
caller passes in (the CLI draws a bar); the library draws nothing itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch

from rlvrx.io.atomic import atomic_write_text
from rlvrx.config import Recipe, recipe_to_yaml
from rlvrx import models
from rlvrx.errors import ParameterError, RlvrxError, UsageError
from rlvrx.hub import model_dir
from rlvrx.train.tracking import PROJECT, Tracker, run_name
from rlvrx.generation import SamplingParams, generate
from rlvrx.generation.decode import NonFiniteLogits
from rlvrx.io.locks import run_locked
from rlvrx.models import load_pretrained
from rlvrx.rundir import RunDir
from rlvrx.train import rollout as rollouts
from rlvrx.train import state as checkpoints
from rlvrx.train.rollout import StepBatch
from rlvrx.train.update import NonFiniteLoss, grpo_step
from rlvrx.trajectory import Trajectory


def resolve_device(name: str) -> torch.device:
    """The recipe's model.device (errors name that key)."""
    return models.resolve_device(name, "model.device")


def _training_part(recipe_text: str):
    """The recipe minus what does not change training: trackers (`logger`), the `stages` of `rlvrx run`
    and the description may change between the runs of one run directory."""
    import yaml

    data = yaml.safe_load(recipe_text)
    if isinstance(data, dict):
        for key in ("logger", "stages", "description"):
            data.pop(key, None)
    return data


def load_model(recipe: Recipe, device: torch.device):
    """(model, tokenizer) from model.path or a freshly built model.tiny."""
    cfg = recipe.model
    dtype = getattr(torch, cfg.dtype)
    if cfg.tiny is not None:
        from rlvrx.tiny import build_tiny_model

        model, tokenizer = build_tiny_model(**cfg.tiny.model_dump())
        return model.to(device=device, dtype=dtype), tokenizer
    return load_pretrained(model_dir(cfg.path), device, dtype)


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


class TrainingProgress(Protocol):
    """What the trainer reports as it goes (rlvrx.cli.progress.TrainProgress draws it as a bar)."""

    def start(self, description: str, total: int, completed: int = 0) -> None: ...

    def sft_update(self, record: dict) -> None: ...

    def grpo_update(self, record: dict) -> None: ...


class NoProgress:
    """Reports nowhere: the default when the caller passes no progress."""

    def start(self, description: str, total: int, completed: int = 0) -> None:
        pass

    def sft_update(self, record: dict) -> None:
        pass

    def grpo_update(self, record: dict) -> None:
        pass


class RecipeMismatch(ParameterError):
    """The run directory holds another recipe; parameter `force` overrides that."""

    def __init__(self, run_dir: Path, saved: Path):
        self.run_dir, self.saved = run_dir, saved
        super().__init__(
            "{run_dir} holds a different recipe ({saved}); use another output.dir, or pass {force} to continue with this one",
            "force=True",
            run_dir=run_dir,
            saved=saved,
        )

    def __reduce__(self) -> tuple:
        return RecipeMismatch, (self.run_dir, self.saved)


class Trainer:
    progress_label = "GRPO"

    def __init__(self, recipe: Recipe, run_dir: str | Path | None = None, force: bool = False, progress: TrainingProgress | None = None):
        self.recipe = recipe
        self.run_dir = Path(run_dir or recipe.output.dir)
        self.rundir = RunDir(self.run_dir)
        self.force = force
        self.progress = progress
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
            raise UsageError(f"grpo.batch_size ({cfg.batch_size}) is not divisible by grpo.mini_batch_size ({cfg.mini_batch_size})")

    def _check_run_dir(self) -> str:
        """The recipe's YAML; refuse a run dir that holds a different recipe (unless force)."""
        saved = self.rundir.recipe
        text = recipe_to_yaml(self.recipe)
        if saved.is_file() and not self.force:
            try:
                same = saved.read_bytes() == text.encode() or _training_part(saved.read_text()) == _training_part(text)
            except OSError as exc:
                raise UsageError(f"{saved}: cannot read: {exc.strerror or exc}") from None
            if not same:
                raise RecipeMismatch(self.run_dir, saved)
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
        atomic_write_text(self.rundir.recipe, recipe_text)
        self.ref_model = None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.999))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.cfg.warmup_steps))
        self.step = 0
        self.grad_step = 0
        self.elapsed = 0.0
        self.eval_seconds = 0.0
        self._pool = None
        self.tracker: Tracker | None = Tracker(
            self.recipe.logger,
            self.run_dir,
            project=PROJECT,
            run_name=run_name(self.run_dir),
            task=self.recipe.task.name,
            config={"recipe": recipe_text},
        )

    # -- checkpoints (rlvrx.train.state) and the metrics log (rlvrx.rundir) ---------------------

    def checkpoint_dir(self, step: int) -> Path:
        return self.rundir.checkpoint(step)

    def save(self, kind: str = "rl", extra_state: dict | None = None) -> Path:
        """Write the live model (and trainer state) as checkpoints/step_N, atomically, and register it."""
        return checkpoints.save_checkpoint(self, kind, extra_state)

    def latest_checkpoint(self) -> Path | None:
        return checkpoints.latest_checkpoint(self.trajectory)

    def restore(self, path: Path) -> dict:
        return checkpoints.restore(self, path)

    def log(self, record: dict) -> None:
        self.rundir.append_metrics(record)
        if self.tracker is not None:
            self.tracker.log(record)

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
            from rlvrx.verify.pool import GradingPool

            self._pool = GradingPool()
        return self._pool

    def close(self) -> None:
        if getattr(self, "tracker", None) is not None:
            self.tracker.close()
            self.tracker = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    # -- SFT warm-up ----------------------------------------------------------------------------

    def sft(self, progress=None) -> list[dict]:
        from rlvrx.train.sft import run_sft

        return run_sft(self, progress=progress)

    # -- GRPO -----------------------------------------------------------------------------------

    def rollout(self, step: int) -> tuple[StepBatch, dict]:
        return rollouts.rollout(self, step)

    def grpo_step(self) -> dict:
        """One GRPO step at self.step (rlvrx.train.update)."""
        return grpo_step(self)

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
        The run directory is this process's alone meanwhile: a second trainer is refused at once.
        Progress goes to the trainer's `progress` (nowhere without one, or with show_progress=False)."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UsageError(f"output.dir {self.run_dir} is a file, not a run directory")
        with run_locked(self.run_dir):
            self.setup()
            try:
                return self._fit(show_progress)
            finally:
                self.close()

    def _fit(self, show_progress: bool) -> dict:
        progress = self.progress if show_progress and self.progress is not None else NoProgress()
        t_start = time.perf_counter()
        summary: dict = {"run_dir": str(self.run_dir), "resumed_from": None}
        latest = self.latest_checkpoint()
        state = None
        if latest is not None:
            state = self.restore(latest)
            self.rundir.truncate_metrics(self.step)
            summary["resumed_from"] = self.step
        else:
            self.rundir.clear_metrics()
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
                    f"{exc}; training stopped, the last good checkpoint {self.latest_checkpoint()} is kept (lower grpo.lr or grpo.max_grad_norm)"
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

    def summary(self) -> dict:
        records = self.rundir.read_metrics()
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


def train(recipe: Recipe, run_dir: str | Path | None = None, force: bool = False, show_progress: bool = True, progress: TrainingProgress | None = None) -> dict:
    """Run (or resume) SFT + GRPO as the recipe says; return a summary."""
    return Trainer(recipe, run_dir, force=force, progress=progress).fit(show_progress=show_progress)
