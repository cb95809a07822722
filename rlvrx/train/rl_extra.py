"""RL-Extra: m GRPO steps, then a jump n steps ahead along the drift, repeated, in one process.

The jump is applied in place to the live parameters (no save/reload round trip):
  two_point, anchor cycle_start (the paper):  W <- W_a + ((m + n) / m) (W_b - W_a)
  two_point, anchor window:  the anchor is the run's step-0 state, so the line is the whole drift so far:
                             W <- W_0 + ((S + n) / S) (W_b - W_0), S = effective steps since step 0
  lstsq:  the least-squares line through the cycle's m + 1 states (t = 0..m), evaluated at t = m + n;
          kept as two running sums per parameter (sum W_t, sum t W_t), never m copies of the model.
Norm weights keep their latest value (norms: copy, as the paper does) unless norms: extrapolate.
Optimizer state after a jump: keep (Adam moments untouched), reset (cleared, as a fresh AdamW),
rescale (first moment zeroed, second moment and step kept: the per-parameter step size survives,
the stale direction does not).

Step bookkeeping: `grad_step` counts optimizer steps actually taken; `step` is the effective step
(grad steps + jumped steps). Checkpoints are named by effective step; the pre-jump state enters the
trajectory as kind rl and the post-jump state as kind extrapolated, both with their grad_step.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlvrx.config import Recipe
from rlvrx.errors import UsageError
from rlvrx.formulas import DEFAULT_COPY_PATTERNS, is_copied, jump
from rlvrx.train.trainer import Trainer


def lstsq_predict(sum_y: torch.Tensor, sum_ty: torch.Tensor, m: int, target: float) -> torch.Tensor:
    """Value at `target` of the least-squares line through (t, W_t), t = 0..m, from sum W_t and sum t W_t."""
    count = m + 1
    t_mean = m / 2
    s_tt = sum((t - t_mean) ** 2 for t in range(count))
    slope = (sum_ty - t_mean * sum_y) / s_tt
    intercept = sum_y / count - slope * t_mean
    return intercept + slope * target


class RLExtraTrainer(Trainer):
    progress_label = "RL-Extra"

    def __init__(self, recipe: Recipe, run_dir: str | Path | None = None, force: bool = False, progress=None):
        if recipe.rl_extra is None:
            raise UsageError("the recipe has no rl_extra section (m, n, iterations, ...); add one to run RL-Extra")
        self.rl_extra = recipe.rl_extra
        if self.rl_extra.anchor == "window" and self.rl_extra.fit == "lstsq":
            raise UsageError("rl_extra: anchor window applies to fit two_point; lstsq always fits the cycle's own states")
        super().__init__(recipe, run_dir, force=force, progress=progress)
        self.anchor: dict[str, torch.Tensor] = {}
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.anchor_step = 0

    # -- budget and cadence ---------------------------------------------------------------------

    def total_grad_steps(self) -> int:
        return self.rl_extra.m * self.rl_extra.iterations

    def should_save(self) -> bool:
        """Mid-cycle saves only: the cycle's last state and the jumped one are saved by `after_step`."""
        return self.grad_step % self.cfg.save_every == 0 and self.grad_step % self.rl_extra.m != 0

    # -- state ----------------------------------------------------------------------------------

    def _jumped_params(self):
        for name, param in self.model.named_parameters():
            if self.rl_extra.norms == "copy" and is_copied(name, param.dtype, DEFAULT_COPY_PATTERNS):
                continue
            yield name, param

    def _start_cycle(self) -> None:
        """The current state becomes the anchor (and the first point of the lstsq sums)."""
        self.anchor_step = self.step
        with torch.no_grad():
            if self.rl_extra.fit == "lstsq":
                self.sums = {name: (p.detach().double().clone(), torch.zeros_like(p, dtype=torch.float64)) for name, p in self._jumped_params()}
            elif self.rl_extra.anchor == "cycle_start" or not self.anchor:
                self.anchor = {name: p.detach().clone() for name, p in self._jumped_params()}

    def save(self, kind: str = "rl", pending_jump: bool = False) -> Path:
        extra = {"rl_extra": {"anchor_step": self.anchor_step, "sums": self.sums, "pending_jump": pending_jump}}
        return super().save(kind, extra)

    def on_start(self, resumed_state: dict | None) -> None:
        if resumed_state is None:
            self._start_cycle()
            return
        saved = resumed_state.get("rl_extra")
        if saved is None:
            raise UsageError(f"{self.run_dir} was trained without RL-Extra; use a new output.dir")
        self.anchor_step = int(saved["anchor_step"])
        self.sums = saved["sums"]
        if self.rl_extra.fit == "two_point":
            anchor_dir = self.trajectory.path_of(0 if self.rl_extra.anchor == "window" else self.anchor_step)
            from rlvrx.io.reader import Checkpoint

            with Checkpoint(anchor_dir) as ckpt:
                names = set(ckpt.names())
                self.anchor = {}
                for name, p in self._jumped_params():
                    key = name if name in names else None
                    if key is None:
                        raise UsageError(f"{anchor_dir}: no tensor {name} to resume the RL-Extra anchor from")
                    self.anchor[name] = ckpt.get(key).to(device=p.device, dtype=p.dtype)
        if saved.get("pending_jump"):
            self.jump()

    # -- the jump -------------------------------------------------------------------------------

    def after_step(self, record: dict) -> None:
        if self.rl_extra.fit == "lstsq":
            t = self.grad_step - (self.grad_step - 1) // self.rl_extra.m * self.rl_extra.m  # 1..m within the cycle
            with torch.no_grad():
                for name, p in self._jumped_params():
                    s_y, s_ty = self.sums[name]
                    value = p.detach().double()
                    s_y.add_(value)
                    s_ty.add_(value, alpha=float(t))
        if self.grad_step % self.rl_extra.m == 0:
            self.save(kind="rl", pending_jump=True)
            self.jump()

    def jump(self) -> None:
        m, n = self.rl_extra.m, self.rl_extra.n
        with torch.no_grad():
            if self.rl_extra.fit == "lstsq":
                for name, p in self._jumped_params():
                    s_y, s_ty = self.sums[name]
                    p.copy_(lstsq_predict(s_y, s_ty, m, m + n).to(p.dtype))
            else:
                span = self.step - (0 if self.rl_extra.anchor == "window" else self.anchor_step)
                alpha = (span + n) / span
                for name, p in self._jumped_params():
                    p.copy_(jump(self.anchor[name], p.detach(), alpha))
        self._apply_optimizer_policy()
        self.step += n
        self._start_cycle()
        record = {"stage": "jump", "step": self.step, "grad_step": self.grad_step, "elapsed": self.elapsed}
        record["test_accuracy"] = self.greedy_accuracy()
        self.log(record)
        self.save(kind="extrapolated")

    def _apply_optimizer_policy(self) -> None:
        policy = self.rl_extra.optimizer_state
        if policy == "reset":
            self.optimizer.state.clear()
        elif policy == "rescale":
            for state in self.optimizer.state.values():
                if "exp_avg" in state:
                    state["exp_avg"].zero_()


def train_rl_extra(recipe: Recipe, run_dir: str | Path | None = None, force: bool = False, show_progress: bool = True, progress=None) -> dict:
    """Run (or resume) SFT + RL-Extra as the recipe says; return a summary."""
    return RLExtraTrainer(recipe, run_dir, force=force, progress=progress).fit(show_progress=show_progress)


def baseline_recipe(recipe: Recipe) -> Recipe:
    """Plain GRPO with the same seed and gradient-step budget, in RUN-baseline."""
    rl_extra = recipe.rl_extra
    return recipe.model_copy(
        update={
            "rl_extra": None,
            "grpo": recipe.grpo.model_copy(update={"steps": rl_extra.m * rl_extra.iterations}),
            "output": recipe.output.model_copy(update={"dir": str(recipe.output.dir).rstrip("/") + "-baseline"}),
        }
    )
