"""Logits processing: temperature, top-k and the exact top-p (nucleus) search, as log-probs."""

from __future__ import annotations

import torch

from rlvrx.generation.params import SamplingParams

__all__ = ["process_logits", "sampling_distribution"]


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


def sampling_distribution(logits: torch.Tensor, params: SamplingParams):
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
    groups, _ = sampling_distribution(flat, params)
    if groups[0][0] is None:
        return groups[0][1].reshape(shape)
    full = torch.full((flat.shape[0], shape[-1] + 1), float("-inf"), device=flat.device)
    for rows, logprobs, ids in groups:
        full[rows] = full[rows].scatter_(-1, ids, logprobs)
    return full[:, :-1].reshape(shape)
