"""Batched autoregressive sampling with a KV cache for Hugging Face causal LMs.

The decoding loop (`generate`) talks to a *logits source*: anything with `prefill`, `step`, `close`
and a few attributes (see `LogitsSource`). `ModelSource` wraps one model; the logits-extrapolation
source `ExtrapolatedSource` combines two (both in sources.py). Prompts are left-padded, so every row's next token
sits in the last column; finished rows are dropped from the KV cache and stop costing compute.

Randomness: each row (prompt i, sample j) draws its uniforms from its own `torch.Generator` seeded
from `(seed, i, j)`, and the token is picked by inverse-CDF sampling with one uniform per step.
A row's random stream therefore depends neither on the other rows finishing early nor on the batch
layout. Guarantee: same seed, same prompts, same `n`/`max_new_tokens` and same batch layout =>
identical tokens on the same machine. A different `batch_size` keeps the random streams but can
change logits by floating-point rounding (different padding / matmul shapes), which in rare
near-ties changes a token. Callers that generate repeatedly (a trainer, once per step) must vary
`seed` between calls, or every call replays the same streams.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from rlvrx.errors import RlvrxError, UsageError
from rlvrx.generation.logits import sampling_distribution
from rlvrx.generation.params import Generation, SamplingParams
from rlvrx.generation.rng import inverse_cdf_sample, row_uniforms
from rlvrx.generation.sources import ModelSource, eval_mode

__all__ = ["NonFiniteLogits", "generate", "left_pad"]


class NonFiniteLogits(RlvrxError):
    """A model whose logits are NaN or inf cannot be sampled from."""


def _encode_prompts(prompts, tokenizer, add_special_tokens: bool, vocab_size: int) -> list[list[int]]:
    encoded = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise UsageError(f"prompt {i} is text but no tokenizer was given; pass a tokenizer or token ids")
            ids = list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
        else:
            ids = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        if not ids:
            raise UsageError(f"prompt {i} is empty after tokenization; every prompt needs at least one token")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise UsageError(f"prompt {i} has token id {bad[0]} outside the model vocabulary (size {vocab_size})")
        encoded.append(ids)
    return encoded


def _stop_ids(params: SamplingParams, tokenizer, source) -> tuple[int, ...]:
    if params.stop_token_ids is not None:
        return params.stop_token_ids
    ids = set(getattr(source, "eos_token_ids", ()))
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    if eos is not None:
        ids.add(int(eos))
    return tuple(sorted(ids))


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [N, max_len], real tokens right-aligned."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    width = int(lengths.max())
    flat = np.fromiter((int(t) for s in sequences for t in s), dtype=np.int64, count=int(lengths.sum()))
    mask = np.arange(width)[None, :] >= (width - lengths)[:, None]
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    ids[mask] = flat  # row-major order of the True cells = each row's tokens in order
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask.astype(np.int64)).to(device)


def generate(
    source,
    tokenizer,
    prompts: Sequence[str | Sequence[int]],
    n: int = 1,
    params: SamplingParams | None = None,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    add_special_tokens: bool = False,
    prompt_keys: Sequence[int] | None = None,
) -> list[Generation]:
    """Sample `n` completions for every prompt; results ordered by (prompt_index, sample_index).

    source: a LogitsSource, or a bare model (wrapped in ModelSource). tokenizer: used to encode text
    prompts (add_special_tokens=False by default: prompts are expected fully formatted, chat
    template/BOS included), to decode texts (special tokens skipped) and for its eos id; it may be
    None when prompts are token ids (then `text` is None). Rows (prompt x sample, prompt-major) are
    decoded `batch_size` at a time (None = all at once); each prompt is prefilled once per batch and
    its KV cache shared by its samples. A row stops at a stop token ("eos") or after
    max_new_tokens, or when it reaches the model's max_position_embeddings ("length").
    progress(k) is called with the number of rows that just finished. prompt_keys: row (i, j) draws
    its random stream from (seed, prompt_keys[i], j) instead of (seed, i, j), so a prompt's samples
    do not depend on its position among the prompts (eval keys each problem by its id).
    """
    params = params or SamplingParams()
    if n < 1:
        raise UsageError(f"number of samples per prompt must be >= 1, got {n}")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"generation batch_size must be >= 1, got {batch_size}")
    if isinstance(source, torch.nn.Module):
        source = ModelSource(source)
    prompt_ids = _encode_prompts(prompts, tokenizer, add_special_tokens, source.vocab_size)
    if not prompt_ids:
        return []
    max_pos = source.max_positions
    if max_pos is not None:
        for i, ids in enumerate(prompt_ids):
            if len(ids) >= max_pos:
                raise UsageError(f"prompt {i} has {len(ids)} tokens, leaving no room in the model context of {max_pos} positions; shorten the prompt")
    stop_ids = _stop_ids(params, tokenizer, source)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad_id = 0 if pad_id is None else int(pad_id)

    if prompt_keys is not None and len(prompt_keys) != len(prompt_ids):
        raise ValueError(f"{len(prompt_keys)} prompt keys for {len(prompt_ids)} prompts")
    keys = [int(k) for k in prompt_keys] if prompt_keys is not None else list(range(len(prompt_ids)))
    rows = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
    chunk = batch_size or len(rows)
    results: list[Generation] = []
    with eval_mode(source.models):
        for start in range(0, len(rows), chunk):
            chunk_rows = rows[start : start + chunk]
            limits = [params.max_new_tokens if max_pos is None else min(params.max_new_tokens, max_pos - len(prompt_ids[i])) for i, _ in chunk_rows]
            uniforms = None if params.greedy else row_uniforms(params.seed, [(keys[i], j) for i, j in chunk_rows], max(limits))
            with torch.inference_mode():
                raw = _decode_rows(source, prompt_ids, chunk_rows, limits, uniforms, params, stop_ids, pad_id, progress)
            results.extend(_to_generations(raw, prompt_ids, chunk_rows, tokenizer))
    return results


def _decode_rows(source, prompt_ids, rows, limits, uniforms, params, stop_ids, pad_id, progress):
    """Decode one batch of rows; returns CPU tensors (tokens, logprobs, raw_logprobs, lengths, eos)."""
    device = source.device
    batch = len(rows)
    steps = max(limits)
    unique_prompts = list(dict.fromkeys(i for i, _ in rows))
    slot = {p: k for k, p in enumerate(unique_prompts)}
    input_ids, mask = left_pad([prompt_ids[p] for p in unique_prompts], pad_id, device)
    row_map = torch.tensor([slot[i] for i, _ in rows], dtype=torch.long, device=device)
    if len(unique_prompts) == batch:
        row_map = None

    tokens = torch.zeros(batch, steps, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch, steps, dtype=torch.float32, device=device)
    raw_logprobs = torch.zeros(batch, steps, dtype=torch.float32, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    hit_eos = torch.zeros(batch, dtype=torch.bool, device=device)
    limit_t = torch.tensor(limits, dtype=torch.long, device=device)
    stop_t = torch.tensor(stop_ids, dtype=torch.long, device=device)
    uniforms = uniforms.to(device) if uniforms is not None else None
    active = torch.arange(batch, device=device)

    try:
        logits = source.prefill(input_ids, mask, row_map)
        for t in range(steps):
            # One sum instead of an elementwise isfinite pass: a NaN or inf makes it non-finite; only then
            # (or for a sum of finite values that overflows) the exact check.
            if not torch.isfinite(logits.sum()) and not bool(torch.isfinite(logits).all()):
                raise NonFiniteLogits(f"the model produced non-finite logits (NaN or inf) at generation step {t}; its weights are likely diverged")
            groups, raw = sampling_distribution(logits, params)
            next_tokens = torch.empty(logits.shape[0], dtype=torch.long, device=device)
            chosen = torch.empty(logits.shape[0], dtype=torch.float32, device=device)
            for rows, processed, candidate_ids in groups:
                if uniforms is None:
                    column = processed.argmax(-1, keepdim=True)
                else:
                    draws = uniforms[active if rows is None else active[rows], t]
                    column = inverse_cdf_sample(processed, draws).unsqueeze(-1)
                pick = column if candidate_ids is None else candidate_ids.gather(-1, column)
                where = slice(None) if rows is None else rows
                next_tokens[where] = pick.squeeze(-1)
                chosen[where] = processed.gather(-1, column).squeeze(-1)
            tokens[active, t] = next_tokens
            logprobs[active, t] = chosen
            if raw is None:
                raw = torch.log_softmax(logits, dim=-1)
            raw_logprobs[active, t] = raw.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)
            stopped = torch.isin(next_tokens, stop_t) if stop_t.numel() else torch.zeros_like(next_tokens, dtype=torch.bool)
            finished = stopped | (limit_t[active] <= t + 1)
            done_rows = active[finished]
            lengths[done_rows] = t + 1
            hit_eos[done_rows] = stopped[finished]
            keep = (~finished).nonzero().squeeze(-1)
            n_done = int(finished.shape[0] - keep.shape[0])
            if progress is not None and n_done:
                progress(n_done)
            if keep.numel() == 0:
                break
            active = active[keep]
            logits = source.step(next_tokens[keep], None if n_done == 0 else keep)
    finally:
        source.close()
    return tokens.cpu(), logprobs.cpu(), raw_logprobs.cpu(), lengths.cpu(), hit_eos.cpu()


def _to_generations(raw, prompt_ids, rows, tokenizer) -> list[Generation]:
    tokens, logprobs, raw_logprobs, lengths, hit_eos = (x.clone() for x in raw)  # leave inference mode
    length_list = lengths.tolist()
    ids = [row[:n] for row, n in zip(tokens.tolist(), length_list)]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True) if tokenizer is not None else [None] * len(ids)
    eos_list = hit_eos.tolist()
    out = []
    for r, (i, j) in enumerate(rows):
        length = length_list[r]
        out.append(
            Generation(
                prompt_index=i,
                sample_index=j,
                prompt_ids=list(prompt_ids[i]),
                token_ids=ids[r],
                text=texts[r],
                logprobs=logprobs[r, :length],
                raw_logprobs=raw_logprobs[r, :length],
                finish_reason="eos" if eos_list[r] else "length",
            )
        )
    return out
