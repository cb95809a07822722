"""One GRPO step's rollouts: sample a group per prompt, grade, compute advantages, pack the batch; and
the per-token log-probs of a batch's responses under a model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rlvrx.generation import SamplingParams, generate, left_pad, pack_prompt_response
from rlvrx.generation.scoring import shared_prompt_token_logprobs
from rlvrx.train.grpo import group_advantages, zero_std_fraction


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


def step_examples(train_examples: list, seed: int, batch_size: int, step: int) -> list:
    """The step's prompts, drawn from (seed, step) alone, so a resumed run draws the same ones."""
    rng = np.random.default_rng([seed, step])
    n = len(train_examples)
    idx = rng.choice(n, size=batch_size, replace=batch_size > n)
    return [train_examples[i] for i in idx]


def rollout(trainer, step: int) -> tuple[StepBatch, dict]:
    """Sample `num_generations` responses per prompt of `step`, grade them, and pack the batch; also the
    step's rollout statistics (reward, accuracy, spreads, response length)."""
    cfg, task, tokenizer, device = trainer.cfg, trainer.task, trainer.tokenizer, trainer.device
    group = trainer.num_generations
    examples = step_examples(trainer.train_examples, cfg.seed, cfg.batch_size, step)
    prompts = [task.encode_prompt(ex, tokenizer) for ex in examples]
    params = SamplingParams(
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed * 1_000_003 + step,
    )
    gens = generate(trainer.model, tokenizer, prompts, n=group, params=params)
    rewards = torch.tensor(
        task.rewards([g.text for g in gens], [examples[g.prompt_index] for g in gens], pool=trainer.grading_pool()),
        dtype=torch.float32,
    )
    advantages = group_advantages(rewards, group, cfg.scale_rewards)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    packed = pack_prompt_response([g.prompt_ids for g in gens], [g.token_ids for g in gens], pad_id=pad, device=device)
    resp = packed.response_mask.to(torch.float32)
    lengths = resp.sum(1)
    stats = {
        "reward_mean": float(rewards.mean()),
        "accuracy": float((rewards >= 1.0).float().mean()),
        "reward_std": float(rewards.std()),
        "advantage_std": float(advantages.std()),
        "frac_zero_std": zero_std_fraction(rewards, group),
        "response_length": float(lengths.mean()),
    }
    prompt_ids, prompt_mask = left_pad(prompts, pad, device)
    prompt_index = torch.tensor([g.prompt_index for g in gens], dtype=torch.long, device=device)
    batch = StepBatch(
        packed.input_ids,
        packed.attention_mask,
        resp,
        rewards,
        advantages.to(device),
        prompt_ids,
        prompt_mask,
        prompt_index,
    )
    return batch, stats


def response_logprobs(model, batch: StepBatch, temperature: float, rows=slice(None), with_entropy=False):
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
        temperature=temperature,
        with_entropy=with_entropy,
    )
