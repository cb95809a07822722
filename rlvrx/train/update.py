"""One GRPO step: the rollouts (rlvrx.train.rollout), then ppo_epochs x mini-batches of clipped policy
updates with gradient clipping; a non-finite loss or gradient stops training."""

from __future__ import annotations

import time

import numpy as np
import torch

from rlvrx.errors import RlvrxError
from rlvrx.train.grpo import policy_loss
from rlvrx.train.rollout import response_logprobs


class NonFiniteLoss(RlvrxError):
    def __init__(self, step: int):
        self.step = step
        super().__init__(f"non-finite loss or gradient at step {step}")


def grpo_step(trainer) -> dict:
    """One GRPO step at trainer.step: rollout, then ppo_epochs x mini-batches of clipped updates; the step's record."""
    t0 = time.perf_counter()
    cfg = trainer.cfg
    batch, stats = trainer.rollout(trainer.grad_step)
    n_rows = batch.input_ids.shape[0]
    mini = (cfg.mini_batch_size or cfg.batch_size) * trainer.num_generations
    # Fully on-policy (one update per rollout): the old policy is the current one, detached; no extra forward.
    on_policy = cfg.ppo_epochs == 1 and mini >= n_rows
    with torch.no_grad():
        old_logprobs = None if on_policy else response_logprobs(trainer.model, batch, cfg.temperature)[0]
        ref_logprobs = response_logprobs(trainer.ref_model, batch, cfg.temperature)[0] if trainer.ref_model is not None else None
    losses, kls, entropies, grad_norms, clip_fracs = [], [], [], [], []
    trainer.model.train()
    for _ in range(cfg.ppo_epochs):
        for start in range(0, n_rows, mini):
            rows = slice(start, start + mini)
            logprobs, entropy = response_logprobs(trainer.model, batch, cfg.temperature, rows, with_entropy=True)
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
                raise NonFiniteLoss(trainer.step)
            trainer.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), cfg.max_grad_norm)
            if not torch.isfinite(grad_norm):
                raise NonFiniteLoss(trainer.step)
            trainer.optimizer.step()
            trainer.scheduler.step()
            mask = batch.response_mask[rows]
            losses.append(lstats.loss)
            kls.append(lstats.kl)
            clip_fracs.append(lstats.clip_fraction)
            entropies.append(float((entropy * mask).sum() / mask.sum().clamp(min=1)))
            grad_norms.append(float(grad_norm))
    trainer.model.eval()
    trainer.step += 1
    trainer.grad_step += 1
    return {
        "step": trainer.step,
        "grad_step": trainer.grad_step,
        **stats,
        "loss": float(np.mean(losses)),
        "kl": float(np.mean(kls)),
        "clip_fraction": float(np.mean(clip_fracs)),
        "entropy": float(np.mean(entropies)),
        "grad_norm": float(np.mean(grad_norms)),
        "lr": trainer.scheduler.get_last_lr()[0],
        "step_time": time.perf_counter() - t0,
    }
