"""GRPO's arithmetic: group-normalised advantages and the clipped policy-gradient loss.

Names follow TRL's GRPOConfig and the DAPO paper: epsilon / epsilon_high clip the ratio asymmetrically,
beta weighs the low-variance (k3) KL to a reference policy, loss_agg picks how token losses are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-4


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group", eps: float = EPS) -> torch.Tensor:
    """(r - group mean) / (std + eps) per group of num_generations consecutive samples.

    scale_rewards: "group" divides by each group's std, "batch" by the whole batch's std, "none" only
    centres (Dr. GRPO). Std is the unbiased sample std, as in TRL and verl.
    """
    rewards = rewards.to(torch.float32)
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    grouped = rewards.view(-1, num_generations)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale_rewards == "batch":
        centred = centred / (rewards.std() + eps)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, not {scale_rewards!r}")
    return centred.reshape(-1)


def zero_std_fraction(rewards: torch.Tensor, num_generations: int) -> float:
    """Fraction of groups whose rewards are all equal (they carry no learning signal)."""
    grouped = rewards.view(-1, num_generations)
    return float((grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean())


def aggregate(values: torch.Tensor, mask: torch.Tensor, loss_agg: str) -> torch.Tensor:
    """token-mean: over all response tokens of the batch; seq-mean-token-mean: per sequence, then over sequences."""
    mask = mask.to(values.dtype)
    if loss_agg == "token-mean":
        return (values * mask).sum() / mask.sum().clamp(min=1)
    if loss_agg == "seq-mean-token-mean":
        per_seq = (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        return per_seq.mean()
    raise ValueError(f"loss_agg must be token-mean or seq-mean-token-mean, not {loss_agg!r}")


@dataclass
class LossStats:
    loss: float
    pg_loss: float
    kl: float
    clip_fraction: float


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_agg: str = "token-mean",
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, LossStats]:
    """Clipped surrogate loss over response tokens [B, T]; advantages are per sequence [B].

    per token: -min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A) + beta * k3(ref || policy),
    with k3 = exp(ref - logp) - (ref - logp) - 1.
    """
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    pg_loss = aggregate(per_token, mask, loss_agg)
    kl_value = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    loss = pg_loss
    if ref_logprobs is not None and beta > 0:
        delta = ref_logprobs - logprobs
        kl_tokens = torch.exp(delta) - delta - 1.0
        kl_value = aggregate(kl_tokens, mask, loss_agg)
        loss = pg_loss + beta * kl_value
    with torch.no_grad():
        m = mask.bool()
        clip_fraction = float((unclipped != clipped)[m].float().mean()) if m.any() else 0.0
    return loss, LossStats(float(loss.detach()), float(pg_loss.detach()), float(kl_value.detach()), clip_fraction)
