"""Batched autoregressive sampling with a KV cache for Hugging Face causal LMs.

The decoding loop (`generate`) talks to a *logits source*: anything with `prefill`, `step`, `close`
and a few attributes (see `LogitsSource`). `ModelSource` wraps one model; the logits-extrapolation
source in `logits_extrapolation.py` combines two. Prompts are left-padded, so every row's next token
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

import contextlib
import inspect
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from rlvrx.errors import RlvrxError, UsageError

__all__ = [
    "SamplingParams",
    "Generation",
    "LogitsSource",
    "ModelSource",
    "process_logits",
    "generate",
    "model_vocab_size",
    "model_max_positions",
    "left_pad",
]


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings. temperature 0 = greedy; top_k 0 = off; top_p 1 = off.

    stop_token_ids None means: the tokenizer's eos token plus the model's generation_config eos ids;
    an empty tuple means never stop before max_new_tokens.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    seed: int | None = 0
    stop_token_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UsageError(f"sampling temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"sampling top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise UsageError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    """One sampled completion. `token_ids` includes the stop token when finish_reason == "eos".

    logprobs: log-prob of each sampled token under the processed distribution (temperature,
    top-k, top-p; 0.0 for every token under greedy). raw_logprobs: under the unprocessed model
    distribution (temperature 1, no filtering) of the source's logits. Both float32 CPU, one per token.
    """

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    logprobs: torch.Tensor
    raw_logprobs: torch.Tensor
    finish_reason: str  # "eos" | "length"


# ---------------------------------------------------------------------------------------------
# Logits processing

# Top-p first looks for each row's nucleus among its 64 most probable tokens, then 1024, then among
# the tokens above a mass threshold, and sorts the whole vocabulary only for rows none of these
# settle (a full sort of [rows, V] costs far more than the forward pass on a 32k vocabulary). Every
# stage computes the same numbers for a row (see `_nucleus`), whichever stage settles it.
NUCLEUS_CANDIDATES = (64, 1024)


def _scaled_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k (ties with the k-th value are kept): float32 [rows, V], -inf where cut."""
    x = logits.float() / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    return x


def _nucleus_cut(values: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(found, kept) for rows of log-probs sorted descending: kept = the first position i >= 1 whose
    preceding mass cumsum(p)[i] - p[i] reaches top_p (found False: no such position among these)."""
    probs = values.exp()
    drop = (probs.cumsum(-1) - probs) >= top_p
    drop[:, 0] = False
    found = drop.any(-1)
    kept = torch.where(found, drop.to(torch.uint8).argmax(-1), torch.full_like(found, values.shape[-1], dtype=torch.long))
    return found, kept


def _top_k_candidates(logprobs: torch.Tensor, top_p: float, k: int):
    """(ok, sorted values, ids, kept) among each row's k most probable tokens; a row is ok when its
    cut lies among them and its last kept value beats the k-th (no tie straddles the boundary)."""
    values, ids = torch.topk(logprobs, k, dim=-1, sorted=True)
    ids, by_id = torch.sort(ids, dim=-1)  # topk orders ties arbitrarily; restore ties by token id
    values, by_value = torch.sort(values.gather(-1, by_id), dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, by_value)
    found, kept = _nucleus_cut(values, top_p)
    last_kept = values.gather(-1, (kept - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return found & (last_kept > values[:, -1]), values, ids, kept


def _threshold_candidates(logprobs: torch.Tensor, top_p: float, iterations: int = 12):
    """(ok, sorted values, ids, kept) among the tokens above a per-row threshold whose mass exceeds
    top_p (bisection on the log-prob); every token at or above the threshold is a candidate, so a row
    is ok as soon as its cut lies among them."""
    rows, vocab = logprobs.shape
    probs = logprobs.exp()
    target = top_p + 1e-4  # slack for summation order; `found` below is what decides
    hi = logprobs.max(-1, keepdim=True).values
    lo = hi - 80.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        enough = torch.where(logprobs >= mid, probs, 0.0).sum(-1, keepdim=True) >= target
        lo, hi = torch.where(enough, mid, lo), torch.where(enough, hi, mid)
    inside = logprobs >= lo
    counts = inside.sum(-1)
    row, col = inside.nonzero(as_tuple=True)  # row-major: ascending token ids within a row
    starts = counts.cumsum(0) - counts
    pos = torch.arange(row.shape[0], device=row.device) - starts[row]
    width = int(counts.max())
    values = torch.full((rows, width), float("-inf"), device=logprobs.device)
    ids = torch.full((rows, width), vocab, dtype=torch.long, device=logprobs.device)
    values[row, pos] = logprobs[row, col]
    ids[row, pos] = col
    values, by_value = torch.sort(values, dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, by_value)
    found, kept = _nucleus_cut(values, top_p)
    return found, values, ids, kept


def _full_sort_candidates(logprobs: torch.Tensor, top_p: float):
    values, ids = torch.sort(logprobs, dim=-1, descending=True, stable=True)
    found, kept = _nucleus_cut(values, top_p)
    return torch.ones_like(found), values, ids, kept


def _nucleus(x: torch.Tensor, top_p: float) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Groups (rows, logprobs, token_ids): for the given rows, [n, W] nuclei in token-id order padded
    with (-inf, V); one group per stage, so that a few wide nuclei do not widen every row.

    Exact staged search: the k = 64, then 1024 most probable tokens, then the tokens above a mass
    threshold, then a full sort. Tokens are ordered by log-prob descending, ties by token id (a stable
    sort of the whole row); a stage settles a row only when the row's sorted prefix up to its cut is
    the same as a full sort's, and cumsum's prefix depends on the prefix alone, so every stage gives
    a row the same numbers.
    """
    rows, vocab = x.shape
    logprobs = torch.log_softmax(x, dim=-1)
    stages = [lambda lp, k=k: _top_k_candidates(lp, top_p, k) for k in NUCLEUS_CANDIDATES if k < vocab]
    stages += [lambda lp: _threshold_candidates(lp, top_p), lambda lp: _full_sort_candidates(lp, top_p)]
    pending = torch.arange(rows, device=x.device)
    settled = []  # (row indices, sorted values, ids, kept)
    for stage in stages:
        ok, values, ids, kept = stage(logprobs[pending] if settled else logprobs)
        if bool(ok.all()):
            settled.append((pending, values, ids, kept))
            break
        settled.append((pending[ok], values[ok], ids[ok], kept[ok]))
        pending = pending[~ok]
    groups = []
    for row_idx, values, ids, kept in settled:
        if not row_idx.numel():
            continue
        width = int(kept.max())
        inside = torch.arange(width, device=x.device) < kept.unsqueeze(-1)
        top = values[:, :1]
        values = values[:, :width].masked_fill(~inside, float("-inf"))
        ids, by_id = torch.sort(ids[:, :width].masked_fill(~inside, vocab), dim=-1)
        shifted = (values.gather(-1, by_id) - top).double()
        # Renormalise over the kept tokens; a cumsum (sequential) keeps the sum independent of padding.
        log_total = shifted.exp().cumsum(-1)[:, -1:].log()
        groups.append((row_idx, (shifted - log_total).float(), ids))
    return groups


def _sampling_distribution(logits: torch.Tensor, params: SamplingParams):
    """(groups, raw): the processed distribution of each row of [rows, V] logits.

    groups: (rows, logprobs, token_ids) with rows None = all rows and token_ids None = logprobs is
    [rows, V] in vocabulary order; otherwise logprobs[r, c] belongs to token token_ids[r, c] (a nucleus,
    ascending ids, padded with -inf / V). raw: the log-softmax of the unfiltered logits when temperature
    is 1 and top-k is off (the raw log-probs), else None.
    """
    x = logits.float()
    if params.greedy:
        out = torch.full_like(x, float("-inf"))
        return [(None, out.scatter_(-1, x.argmax(-1, keepdim=True), 0.0), None)], None
    x = _scaled_logits(x, params)
    if params.top_p < 1.0:
        return _nucleus(x, params.top_p), None
    logprobs = torch.log_softmax(x, dim=-1)
    raw = logprobs if params.temperature == 1 and not 0 < params.top_k < x.shape[-1] else None
    return [(None, logprobs, None)], raw


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probs [..., V] (float32, -inf where filtered) of the sampling distribution.

    Order: temperature, then top-k (ties with the k-th value are kept), then top-p (nucleus: the
    smallest set of most probable tokens whose cumulative probability reaches top_p; ties broken by
    token id; the top token is always kept). Greedy (temperature 0) gives 0 at the argmax (first on
    ties), -inf elsewhere.
    """
    shape = logits.shape
    flat = logits.reshape(-1, shape[-1])
    groups, _ = _sampling_distribution(flat, params)
    if groups[0][0] is None:
        return groups[0][1].reshape(shape)
    full = torch.full((flat.shape[0], shape[-1] + 1), float("-inf"), device=flat.device)
    for rows, logprobs, ids in groups:
        full[rows] = full[rows].scatter_(-1, ids, logprobs)
    return full[:, :-1].reshape(shape)


class NonFiniteLogits(RlvrxError):
    """A model whose logits are NaN or inf cannot be sampled from."""


def _inverse_cdf_sample(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Column per row: first index where the cumulative probability exceeds u * total (float64)."""
    cdf = logprobs.double().exp().cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(uniforms.double().unsqueeze(-1) * total, total * (1 - 1e-15))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


def _row_uniforms(seed: int | None, rows: Sequence[tuple[int, int]], steps: int) -> torch.Tensor:
    """[len(rows), steps] float64 uniforms; row (i, j) seeded from (seed, i, j) alone."""
    if seed is None:
        return torch.rand(len(rows), steps, dtype=torch.float64)
    out = torch.empty(len(rows), steps, dtype=torch.float64)
    gen = torch.Generator()
    row_seeds = _row_seeds(int(seed) & (2**63 - 1), [i for i, _ in rows], [j for _, j in rows])
    for r, row_seed in enumerate(row_seeds.tolist()):
        gen.manual_seed(row_seed)
        out[r] = torch.rand(steps, generator=gen, dtype=torch.float64)
    return out


_SS_INIT_A, _SS_MULT_A, _SS_INIT_B, _SS_MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_SS_MIX_L, _SS_MIX_R, _SS_POOL = 0xCA01F9DD, 0x4973F715, 4


def _row_seeds(seed: int, i: Sequence[int], j: Sequence[int]) -> np.ndarray:
    """uint64 per row: np.random.SeedSequence([seed, i, j]).generate_state(1, np.uint64)[0], vectorised.

    The same mixing as numpy's SeedSequence (pool of 4 uint32 words), for all rows at once; one
    SeedSequence object per row cost ~0.1 ms, a tenth of a small GRPO step.
    """
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    if len(i) and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= 2**32):
        return np.array([np.random.SeedSequence([seed, int(a), int(b)]).generate_state(1, np.uint64)[0] for a, b in zip(i, j)], dtype=np.uint64)
    u32 = np.uint32
    seed_words = []
    while True:  # numpy splits an int into little-endian uint32 words
        seed_words.append(seed & 0xFFFFFFFF)
        seed >>= 32
        if not seed:
            break
    entropy = [np.full(len(i), w, dtype=u32) for w in seed_words] + [i.astype(u32), j.astype(u32)]
    hash_const = u32(_SS_INIT_A)

    def hashmix(value):
        nonlocal hash_const
        value = value ^ hash_const
        hash_const = hash_const * u32(_SS_MULT_A)
        value = value * hash_const
        return value ^ (value >> u32(16))

    def mix(x, y):
        result = u32(_SS_MIX_L) * x - u32(_SS_MIX_R) * y
        return result ^ (result >> u32(16))

    with np.errstate(over="ignore"):
        zero = np.zeros(len(i), dtype=u32)
        pool = [hashmix(entropy[k] if k < len(entropy) else zero) for k in range(_SS_POOL)]
        for src in range(_SS_POOL):
            for dst in range(_SS_POOL):
                if src != dst:
                    pool[dst] = mix(pool[dst], hashmix(pool[src]))
        for src in range(_SS_POOL, len(entropy)):
            for dst in range(_SS_POOL):
                pool[dst] = mix(pool[dst], hashmix(entropy[src]))
        out_const = u32(_SS_INIT_B)
        words = []
        for k in range(2):
            value = pool[k] ^ out_const
            out_const = out_const * u32(_SS_MULT_B)
            value = value * out_const
            words.append((value ^ (value >> u32(16))).astype(np.uint64))
    return words[0] | (words[1] << np.uint64(32))


# ---------------------------------------------------------------------------------------------
# Logits sources


class LogitsSource(Protocol):
    """What `generate` needs. All logits returned are float32 [rows, V] for the next token."""

    device: torch.device
    vocab_size: int
    max_positions: int | None  # None = unbounded
    eos_token_ids: tuple[int, ...]
    models: list[torch.nn.Module]  # put in eval mode by `generate` for the duration of a call

    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, row_map: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run left-padded prompts [U, L]; rows of the decoding batch are prompts[row_map] (default: all)."""

    def step(self, next_tokens: torch.Tensor, keep_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Keep `keep_rows` (indices into the previous rows; None = all), then feed one token per kept row."""

    def close(self) -> None:
        """Free the KV cache."""


def model_vocab_size(model: torch.nn.Module) -> int:
    """Rows of the output projection (what the logits are over), else config.vocab_size."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    return int(_text_config(model).vocab_size)


def model_max_positions(model: torch.nn.Module) -> int | None:
    value = getattr(_text_config(model), "max_position_embeddings", None)
    return int(value) if value else None


def keep_logits_kwargs(model: torch.nn.Module, keep: int) -> dict:
    """{"logits_to_keep": keep} when the model's forward takes it (logits of the last positions only), else {}."""
    return {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _text_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _model_eos_ids(model: torch.nn.Module) -> tuple[int, ...]:
    gen_config = getattr(model, "generation_config", None)
    eos = getattr(gen_config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class ModelSource:
    """One causal LM with its own KV cache, under left padding.

    Position ids are counted from each row's first real token; the attention mask grows by one
    column per step; `step(keep_rows=...)` drops finished rows from the cache (batch_select_indices).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.models = [model]
        self.device = _model_device(model)
        self.vocab_size = model_vocab_size(model)
        self.max_positions = model_max_positions(model)
        self.eos_token_ids = _model_eos_ids(model)
        self._keep_last = keep_logits_kwargs(model, 1)
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._next_pos: torch.Tensor | None = None

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **self._keep_last,
        )
        out = self.model(**kwargs)
        return out.logits[:, -1, :].float(), out.past_key_values

    def prefill(self, input_ids, attention_mask, row_map=None):
        input_ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device, dtype=torch.long)
        positions = (mask.cumsum(-1) - 1).clamp_(min=0)
        logits, cache = self._forward(input_ids, mask, positions, None)
        next_pos = positions[:, -1] + 1
        if row_map is not None:
            row_map = row_map.to(self.device)
            cache.batch_select_indices(row_map)
            logits, mask, next_pos = logits[row_map], mask[row_map], next_pos[row_map]
        self._cache, self._mask, self._next_pos = cache, mask, next_pos
        return logits

    def step(self, next_tokens, keep_rows=None):
        if self._cache is None:
            raise RuntimeError("ModelSource.step called before prefill")
        if keep_rows is not None:
            keep_rows = keep_rows.to(self.device)
            self._cache.batch_select_indices(keep_rows)
            self._mask, self._next_pos = self._mask[keep_rows], self._next_pos[keep_rows]
        ones = torch.ones(self._mask.shape[0], 1, dtype=self._mask.dtype, device=self.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        tokens = next_tokens.to(self.device).view(-1, 1)
        logits, self._cache = self._forward(tokens, self._mask, self._next_pos.view(-1, 1), self._cache)
        self._next_pos = self._next_pos + 1
        return logits

    def close(self):
        self._cache = self._mask = self._next_pos = None


@contextlib.contextmanager
def _eval_mode(models: Sequence[torch.nn.Module]):
    """Dropout off while sampling; each model's train/eval flag restored afterwards."""
    unique = list({id(m): m for m in models}.values())
    flags = [m.training for m in unique]
    try:
        for m in unique:
            m.eval()
        yield
    finally:
        for m, flag in zip(unique, flags):
            m.train(flag)


# ---------------------------------------------------------------------------------------------
# Decoding loop


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
                raise UsageError(
                    f"prompt {i} has {len(ids)} tokens, leaving no room in the model context of {max_pos} "
                    "positions; shorten the prompt"
                )
    stop_ids = _stop_ids(params, tokenizer, source)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad_id = 0 if pad_id is None else int(pad_id)

    if prompt_keys is not None and len(prompt_keys) != len(prompt_ids):
        raise ValueError(f"{len(prompt_keys)} prompt keys for {len(prompt_ids)} prompts")
    keys = [int(k) for k in prompt_keys] if prompt_keys is not None else list(range(len(prompt_ids)))
    rows = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
    chunk = batch_size or len(rows)
    results: list[Generation] = []
    with _eval_mode(source.models):
        for start in range(0, len(rows), chunk):
            chunk_rows = rows[start:start + chunk]
            limits = [
                params.max_new_tokens if max_pos is None else min(params.max_new_tokens, max_pos - len(prompt_ids[i]))
                for i, _ in chunk_rows
            ]
            uniforms = None if params.greedy else _row_uniforms(params.seed, [(keys[i], j) for i, j in chunk_rows], max(limits))
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
            groups, raw = _sampling_distribution(logits, params)
            next_tokens = torch.empty(logits.shape[0], dtype=torch.long, device=device)
            chosen = torch.empty(logits.shape[0], dtype=torch.float32, device=device)
            for rows, processed, candidate_ids in groups:
                if uniforms is None:
                    column = processed.argmax(-1, keepdim=True)
                else:
                    row_uniforms = uniforms[active if rows is None else active[rows], t]
                    column = _inverse_cdf_sample(processed, row_uniforms).unsqueeze(-1)
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
