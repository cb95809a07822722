"""Log-prob linearity: teacher-forced log-probs of fixed probe responses at every checkpoint.

Probes are (prompt, response) pairs, read from JSONL or sampled from the first checkpoint. Each
checkpoint is loaded once (float32, CPU unless told otherwise), scores every probe in padded
batches, and is freed before the next one loads. That gives, per response token, a series of K
log-probs (and chosen-token logits); its R² against step is computed as for weights. Tokens whose
log-prob moves by `min_logprob_change` (the paper's 0.2) or less are filtered, and so are constant ones:
filter "endpoints" (the official script, default) keeps a token when |last - first| > min_logprob_change
(first and last checkpoint); "range" keeps it when max - min over all steps >= min_logprob_change.
Each response's mean log-prob gets its own R² as well.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from rlvrx.models import load_model, load_tokenizer
from rlvrx.errors import ParameterError, UsageError
from rlvrx.io.jsonio import iter_jsonl
from rlvrx.linearity import stats

FILTERS = ("endpoints", "range")  # token filters: the official |last - first| >, or max - min >=


@dataclass
class Probe:
    """One response to score after its prompt; `source` names it in messages ("probes.jsonl:3")."""

    source: str
    prompt: str | None = None
    response: str | None = None
    prompt_ids: list[int] | None = None
    response_ids: list[int] | None = None

    def to_json(self) -> dict:
        return {"source": self.source, "prompt": self.prompt, "response": self.response, "prompt_ids": self.prompt_ids, "response_ids": self.response_ids}


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such probes file")
    rows = list(iter_jsonl(path))
    if not rows:
        raise UsageError(f"{path}: holds no probes")
    return rows


def _ids(value, where: str) -> list[int] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise UsageError(f"{where}: token ids must be a list of integers")
    return list(value)


def load_probes(path: str | os.PathLike) -> list[Probe]:
    """Lines of {prompt, response} or {prompt, responses: [...]}; optional prompt_ids/response_ids override the texts."""
    path = Path(path)
    probes = []
    for lineno, row in _read_jsonl(path):
        where = f"{path.name}:{lineno}"
        prompt = row.get("prompt")
        prompt_ids = _ids(row.get("prompt_ids"), where)
        if prompt_ids is None and (not isinstance(prompt, str) or not prompt):
            raise UsageError(f'{path}:{lineno}: needs a non-empty string "prompt"')
        if "responses" in row:
            responses = row["responses"]
            if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
                raise UsageError(f'{path}:{lineno}: "responses" must be a non-empty list of strings')
            probes += [Probe(f"{where}#{j}", prompt, r, prompt_ids) for j, r in enumerate(responses)]
        elif "response" in row or "response_ids" in row:
            response = row.get("response")
            response_ids = _ids(row.get("response_ids"), where)
            if response_ids is None and not isinstance(response, str):
                raise UsageError(f'{path}:{lineno}: "response" must be a string')
            probes.append(Probe(where, prompt, response, prompt_ids, response_ids))
        else:
            raise ParameterError('{path}:{lineno}: needs "response" or "responses" (or use {generate:N} to sample them)', "generate", path=path, lineno=lineno)
    return probes


def load_prompts(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(source, prompt) of every line that has a "prompt" (responses, if any, are ignored)."""
    path = Path(path)
    prompts = []
    for lineno, row in _read_jsonl(path):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise UsageError(f'{path}:{lineno}: needs a non-empty string "prompt"')
        prompts.append((f"{path.name}:{lineno}", prompt))
    return prompts


def tokenize_probes(probes: Sequence[Probe], tokenizer) -> None:
    """Fill prompt_ids / response_ids from the texts (no special tokens added: prompts carry their own)."""
    for probe in probes:
        if probe.prompt_ids is None:
            if tokenizer is None:
                raise UsageError(f"probe {probe.source} is text but no tokenizer is available")
            probe.prompt_ids = list(tokenizer(probe.prompt, add_special_tokens=False)["input_ids"])
        if probe.response_ids is None:
            if tokenizer is None:
                raise UsageError(f"probe {probe.source} is text but no tokenizer is available")
            probe.response_ids = list(tokenizer(probe.response, add_special_tokens=False)["input_ids"])
        if not probe.prompt_ids:
            raise UsageError(f"probe {probe.source}: the prompt is empty after tokenization")


def check_probes(probes: Sequence[Probe], max_positions: int | None) -> None:
    for probe in probes:
        total = len(probe.prompt_ids) + len(probe.response_ids)
        if max_positions is not None and total > max_positions:
            raise UsageError(
                f"probe {probe.source}: prompt + response is {total} tokens, longer than the model context of "
                f"{max_positions}; shorten it or drop it from the probes"
            )
        if not probe.response_ids:
            raise UsageError(f"probe {probe.source}: the response is empty; every probe needs at least one response token")


def task_prompts(name: str, tokenizer, split: str = "test", options: dict | None = None) -> list[tuple[str, list[int]]]:
    """(source, prompt ids) of a task's examples, encoded the task's way (rlvrx.tasks)."""
    from rlvrx.tasks import get_task

    task = get_task(name, **(options or {}))
    examples = task.examples(split)
    if not examples:
        raise UsageError(f"task {name!r} has no {split} examples to take probe prompts from")
    return [(f"{task.name}:{ex.id}", task.encode_prompt(ex, tokenizer)) for ex in examples]


def generate_probes(
    model_path: str | os.PathLike,
    prompts: Sequence[tuple[str, str | Sequence[int]]],
    n: int,
    params,
    batch_size: int = 8,
    device: str = "cpu",
    score_eos: bool = False,
) -> list[Probe]:
    """Sample n probe responses from the model at model_path, cycling through (source, text or ids) prompts.

    A response that stopped at end-of-sequence keeps its stop token only with score_eos (the official
    scripts never score it); a response that was only a stop token keeps it (a probe needs a token)."""
    from rlvrx.generation import generate

    if n < 1:
        raise UsageError(f"generate_probes: n must be >= 1, got {n}")
    if not prompts:
        raise UsageError("generate_probes needs at least one prompt")
    chosen = [prompts[i % len(prompts)] for i in range(n)]
    model = load_model(model_path, device)
    tokenizer = load_tokenizer(model_path)
    generations = generate(model, tokenizer, [p for _, p in chosen], n=1, params=params, batch_size=batch_size)
    del model
    gc.collect()
    probes = []
    for i, ((source, prompt), g) in enumerate(zip(chosen, generations)):
        text = prompt if isinstance(prompt, str) else tokenizer.decode(list(g.prompt_ids))
        response_ids = list(g.token_ids)
        if not score_eos and g.finish_reason == "eos" and len(response_ids) > 1:
            response_ids = response_ids[:-1]
        probes.append(Probe(f"generated {i} ({source})", text, g.text, list(g.prompt_ids), response_ids))
    return probes


def score_checkpoints(
    checkpoints: Sequence[tuple[int, str | os.PathLike]],
    probes: Sequence[Probe],
    batch_size: int = 8,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(logprobs, logits), each [K, total response tokens] float64, probes concatenated in order.

    Loads one checkpoint at a time. progress(step, n_probes_scored) after every batch.
    """
    from rlvrx.generation import score_responses

    prompt_ids = [p.prompt_ids for p in probes]
    response_ids = [p.response_ids for p in probes]
    total = sum(len(r) for r in response_ids)
    logprobs = np.zeros((len(checkpoints), total), dtype=np.float64)
    logits = np.zeros((len(checkpoints), total), dtype=np.float64)
    for k, (step, path) in enumerate(checkpoints):
        model = load_model(path, device)
        row_lp, row_lg = [], []
        for start in range(0, len(probes), batch_size):
            scores = score_responses(model, prompt_ids[start : start + batch_size], response_ids[start : start + batch_size], batch_size)
            row_lp += [s.logprobs.double().numpy() for s in scores]
            row_lg += [s.logits.double().numpy() for s in scores]
            if progress is not None:
                progress(step, len(scores))
        logprobs[k] = np.concatenate(row_lp)
        logits[k] = np.concatenate(row_lg)
        del model
        gc.collect()
    return logprobs, logits


# ----------------------------------------------------------------------------------------------
# Statistics


def analyze_logprobs(
    steps: Sequence[int],
    probes: Sequence[Probe],
    logprobs: np.ndarray,
    logits: np.ndarray,
    min_logprob_change: float = 0.2,
    filter: str = "endpoints",
    score_eos: bool | None = None,
) -> dict:
    """Summary (public keys first) plus per-token and per-response details for CSV and plots.

    filter: "endpoints" (|last - first| > min_logprob_change) or "range" (max - min >= it); score_eos
    is recorded in the summary (None: the probes were given, not generated)."""
    steps = stats.check_steps(steps)
    if not min_logprob_change >= 0:
        raise UsageError(f"min_logprob_change must be >= 0, got {min_logprob_change}")
    if filter not in FILTERS:
        raise UsageError(f"filter must be one of {', '.join(FILTERS)}, got {filter!r}")
    r2, s_yy = stats.r2_columns(logprobs, steps)
    logit_r2, logit_syy = stats.r2_columns(logits, steps)
    span = logprobs.max(axis=0) - logprobs.min(axis=0)
    constant = (span == 0) | (s_yy <= 0)
    if filter == "endpoints":
        change = np.abs(logprobs[-1] - logprobs[0])
        small = ~constant & ~(change > min_logprob_change)
    else:
        change = span
        small = ~constant & (span < min_logprob_change)
    keep = ~(constant | small)
    tokens = stats.summarize_values(r2[keep])
    logit_keep = keep & (logit_syy > 0)
    logit = stats.summarize_values(logit_r2[logit_keep])

    lengths = [len(p.response_ids) for p in probes]
    bounds = np.cumsum([0] + lengths)
    means = np.stack([logprobs[:, a:b].mean(axis=1) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)
    resp_r2, resp_syy = stats.r2_columns(means, steps)
    resp_defined = resp_syy > 0
    responses = stats.summarize_values(resp_r2[resp_defined])

    token_rows = []
    for j, probe in enumerate(probes):
        for pos in range(lengths[j]):
            col = bounds[j] + pos
            reason = "constant" if constant[col] else "min_logprob_change" if small[col] else ""
            token_rows.append(
                {
                    "probe": probe.source,
                    "position": pos,
                    "token_id": probe.response_ids[pos],
                    "logprob_first": float(logprobs[0, col]),
                    "logprob_last": float(logprobs[-1, col]),
                    "change": float(change[col]),
                    "r2": None if constant[col] else float(r2[col]),
                    "logit_r2": float(logit_r2[col]) if logit_syy[col] > 0 else None,
                    "filtered": reason,
                }
            )
    response_rows = [
        {
            "probe": probe.source,
            "n_tokens": lengths[j],
            "mean_logprob": means[:, j].tolist(),
            "r2": float(resp_r2[j]) if resp_defined[j] else None,
        }
        for j, probe in enumerate(probes)
    ]
    hist = stats.histogram(r2[keep], 100)
    return {
        "median_r2": tokens.median,
        "mean_r2": tokens.mean,
        "frac_r2_gt_0_7": tokens.frac_gt_0_7,
        "frac_r2_gt_0_9": tokens.frac_gt_0_9,
        "n_tokens": tokens.n,
        "n_filtered": int((~keep).sum()),
        "steps": steps,
        "filter": filter,
        "min_logprob_change": min_logprob_change,
        "score_eos": score_eos,
        # details
        "n_tokens_scored": int(keep.size),
        "n_probes": len(probes),
        "filters": {"constant": int(constant.sum()), "min_logprob_change": int(small.sum())},
        "logit": logit.to_json(),
        "response_mean_logprob": responses.to_json(),
        "histogram": hist.tolist(),
        "token_rows": token_rows,
        "response_rows": response_rows,
    }


PUBLIC_KEYS = ("median_r2", "mean_r2", "frac_r2_gt_0_7", "frac_r2_gt_0_9", "n_tokens", "n_filtered", "steps", "filter", "min_logprob_change", "score_eos")


def public_json(summary: dict) -> dict:
    return {key: summary[key] for key in PUBLIC_KEYS}
