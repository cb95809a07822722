"""Teacher-forced scoring: per-token log-probs of given responses after given prompts.

- `score_responses` / `token_logprobs`: inference (no grad), any lengths, batched with left padding;
  used by log-prob linearity and anything that re-scores samples.
- `batch_token_logprobs`: differentiable, on an already padded batch; used by the GRPO loss.
Log-softmax is always taken in float32, whatever the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from rlvrx.errors import UsageError
from rlvrx.generation.decode import left_pad
from rlvrx.generation.sources import (
    cache_kwargs,
    eval_mode,
    keep_logits_kwargs,
    model_max_positions,
    model_vocab_size,
    output_cache,
)


@dataclass
class ResponseScores:
    """Per response token (float32, CPU): log p(token | prefix) and the token's raw logit."""

    logprobs: torch.Tensor
    logits: torch.Tensor


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted from each row's first real token (any left/right padding layout)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def _forward_logits(model, input_ids, attention_mask, keep: int) -> torch.Tensor:
    """Logits [B, keep, V] of the last `keep` positions (model dtype)."""
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions_from_mask(attention_mask),
        use_cache=False,
        **keep_logits_kwargs(model, keep),
    )
    return model(**kwargs).logits[:, -keep:, :]


def _check_context(model: torch.nn.Module, positions: int) -> None:
    max_pos = model_max_positions(model)
    if max_pos is not None and positions > max_pos:
        raise UsageError(f"batch has {positions} positions, more than the model context of {max_pos}")


def score_responses(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> list[ResponseScores]:
    """Score each response after its prompt; one ResponseScores per pair, len = len(response).

    Sequences are left-padded, so only the last max(len(response)) + 1 positions of each batch
    need logits. The model runs in eval mode (restored afterwards) under torch.inference_mode.
    """
    if len(prompt_ids) != len(response_ids):
        raise UsageError(f"got {len(prompt_ids)} prompts but {len(response_ids)} responses; pass one prompt per response")
    if batch_size < 1:
        raise UsageError(f"scoring batch_size must be >= 1, got {batch_size}")
    max_pos = model_max_positions(model)
    vocab = model_vocab_size(model)
    for k, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if not len(p):
            raise UsageError(f"prompt {k} is empty; scoring needs at least one prompt token before the response")
        if max_pos is not None and len(p) + len(r) > max_pos:
            raise UsageError(
                f"prompt {k} + response has {len(p) + len(r)} tokens, more than the model context of {max_pos} positions; shorten or drop that probe"
            )
        bad = [t for t in list(p) + list(r) if not 0 <= int(t) < vocab]
        if bad:
            raise UsageError(f"sequence {k} has token id {bad[0]} outside the model vocabulary (size {vocab})")

    device = next(model.parameters()).device
    results: list[ResponseScores] = []
    with eval_mode([model]):
        for start in range(0, len(prompt_ids), batch_size):
            prompts = prompt_ids[start : start + batch_size]
            responses = response_ids[start : start + batch_size]
            with torch.inference_mode():
                batch = _score_batch(model, prompts, responses, device)
            results.extend(ResponseScores(lp.clone(), lg.clone()) for lp, lg in batch)
    return results


def _score_batch(model, prompts, responses, device):
    width = max(len(r) for r in responses)
    if width == 0:
        empty = torch.zeros(0, dtype=torch.float32)
        return [(empty, empty) for _ in responses]
    input_ids, mask = left_pad([list(p) + list(r) for p, r in zip(prompts, responses)], 0, device)
    logits = _forward_logits(model, input_ids, mask, width + 1)[:, :-1, :]  # predicts the last `width` tokens
    targets = input_ids[:, -width:]
    out = []
    for row, response in enumerate(responses):
        n = len(response)
        if n == 0:
            empty = torch.zeros(0, dtype=torch.float32)
            out.append((empty, empty))
            continue
        row_logits = logits[row, width - n :, :].float()
        chosen = row_logits.gather(-1, targets[row, width - n :].unsqueeze(-1)).squeeze(-1)
        logprobs = chosen - torch.logsumexp(row_logits, dim=-1)
        out.append((logprobs.cpu(), chosen.cpu()))
    return out


def token_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    batch_size: int = 16,
) -> list[torch.Tensor]:
    """Per-response-token log-probs (float32 CPU tensors); see `score_responses` for the logits too."""
    return [s.logprobs for s in score_responses(model, prompt_ids, response_ids, batch_size)]


@dataclass
class PackedBatch:
    """Left-padded prompts followed by right-padded responses: [B, P + R], responses in the last R columns.

    response_mask [B, R] lines up with `batch_token_logprobs(model, input_ids, attention_mask,
    logits_to_keep=response_width)`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    response_width: int


def pack_prompt_response(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> PackedBatch:
    if len(prompt_ids) != len(response_ids) or not prompt_ids:
        raise UsageError(f"need one prompt per response, got {len(prompt_ids)} prompts and {len(response_ids)} responses")
    p_len = np.array([len(p) for p in prompt_ids], dtype=np.int64)
    r_len = np.array([len(r) for r in response_ids], dtype=np.int64)
    if (p_len == 0).any():
        raise UsageError(f"prompt {int(np.argmax(p_len == 0))} is empty; a response needs at least one prompt token before it")
    p_width, r_width = int(p_len.max()), max(1, int(r_len.max()))
    cols = np.arange(p_width + r_width)[None, :]
    mask = (cols >= (p_width - p_len)[:, None]) & (cols < (p_width + r_len)[:, None])
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    # row-major order of the masked cells: each row's prompt, then its response
    ids[mask] = np.fromiter(
        (int(t) for p, r in zip(prompt_ids, response_ids) for seq in (p, r) for t in seq), dtype=np.int64, count=int(p_len.sum() + r_len.sum())
    )
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))
    return PackedBatch(ids_t.to(device), mask_t.to(device), mask_t[:, p_width:].clone().to(device), r_width)


def batch_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int | None = None,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Differentiable per-token log-probs on a padded batch [B, T] (any padding layout).

    Returns (logprobs, entropy), each [B, K] float32 with K = T - 1 (or `logits_to_keep`):
    column j scores token input_ids[:, T - K + j] given everything before it, i.e. with
    K = T - 1, logprobs[:, t] = log p(input_ids[:, t + 1] | input_ids[:, :t + 1]). Pass
    logits_to_keep = response width when responses are right-aligned at the end (left-padded
    prompt + right-padded response, then the response mask is the last K columns) to skip prompt
    logits. Logits are divided by `temperature` (use the sampling temperature for the policy
    ratio, as verl and TRL do). Values at padded positions are finite but meaningless: mask them.
    Entropy of the same distribution is detached (a metric), or None when with_entropy=False.
    The model's train/eval mode and grad mode are the caller's.
    """
    seq_len = input_ids.shape[1]
    keep = seq_len - 1 if logits_to_keep is None else int(logits_to_keep)
    if not 1 <= keep <= seq_len - 1:
        raise UsageError(f"logits_to_keep must be in [1, {seq_len - 1}] for sequences of {seq_len} tokens, got {keep}")
    _check_context(model, seq_len)
    logits = _forward_logits(model, input_ids, attention_mask, keep + 1)[:, :-1, :]
    return _target_logprobs(logits, input_ids[:, seq_len - keep :], temperature, with_entropy)


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool):
    """(log-probs of targets, entropy or None) under softmax(logits / temperature), in float32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    entropy = None
    if with_entropy:
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)
            entropy = log_norm - (probs * logits).sum(-1)
    return logprobs, entropy


def shared_prompt_token_logprobs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`batch_token_logprobs` for rows that share prompts (GRPO groups), running each prompt once.

    prompt_ids / prompt_mask [U, P]: left-padded unique prompts; prompt_index [B]: each row's prompt;
    response_ids / response_mask [B, R]: right-padded responses. The prompts go through the model once
    (with grad), their KV cache is repeated per row, then the responses attend to it; this is the same
    computation as the packed [B, P + R] forward up to float rounding, on U * P + B * (R - 1) tokens
    instead of B * (P + R). Returns (logprobs, entropy) [B, R], laid out like the packed call with
    logits_to_keep = R.
    """
    width = response_ids.shape[1]
    _check_context(model, prompt_ids.shape[1] + width)
    positions = positions_from_mask(prompt_mask)
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, **keep_logits_kwargs(model, 1))
    logits = out.logits[:, -1:, :][prompt_index]
    if width > 1:
        cache = output_cache(out)
        cache.batch_select_indices(prompt_index)
        mask = torch.cat([prompt_mask[prompt_index], response_mask.to(prompt_mask.dtype)], dim=1)[:, :-1]
        steps = torch.arange(width - 1, device=positions.device)
        response_positions = positions[prompt_index, -1:] + 1 + steps
        rest = model(
            input_ids=response_ids[:, :-1],
            attention_mask=mask,
            position_ids=response_positions,
            use_cache=True,
            **cache_kwargs(model, cache),
        ).logits
        logits = torch.cat([logits, rest], dim=1)
    return _target_logprobs(logits, response_ids, temperature, with_entropy)
