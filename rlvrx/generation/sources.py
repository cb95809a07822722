"""Logits sources for the decoding loop: one model (`ModelSource`) or two in lockstep (`ExtrapolatedSource`).

A source has `prefill`, `step`, `close` and a few attributes (see `LogitsSource`). Logits
extrapolation: two models decode in lockstep, l = l_base + alpha * (l_second - l_base); plug an
`ExtrapolatedSource` into `rlvrx.generation.generate` and temperature / top-k / top-p and sampling
then apply to the combined logits, and `raw_logprobs` are under softmax(l).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Protocol, Sequence

import torch

from rlvrx.errors import UsageError

__all__ = [
    "LogitsSource",
    "ModelSource",
    "ExtrapolatedSource",
    "combine_logits",
    "eval_mode",
    "keep_logits_kwargs",
    "model_max_positions",
    "model_vocab_size",
]


class LogitsSource(Protocol):
    """What `generate` needs. All logits returned are float32 [rows, V] for the next token."""

    device: torch.device
    vocab_size: int
    max_positions: int | None  # None = unbounded
    eos_token_ids: tuple[int, ...]
    models: list[torch.nn.Module]  # put in eval mode by `generate` for the duration of a call

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, row_map: torch.Tensor | None = None) -> torch.Tensor:
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


def cache_argument(model: torch.nn.Module) -> str:
    """The name the model's forward takes its KV cache under: `cache` in recent transformers 5 releases
    (where `past_key_values` is deprecated), `past_key_values` before (transformers 4.51+)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_kwargs(model: torch.nn.Module, cache) -> dict:
    """{name: cache} for the model's forward (see cache_argument)."""
    return {cache_argument(model): cache}


def output_cache(out):
    """The KV cache a forward returned: the `cache` field where the output class has one, else `past_key_values`."""
    return out.cache if "cache" in getattr(type(out), "__dataclass_fields__", {}) else out.past_key_values


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
        self._cache_name = cache_argument(model)
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._next_pos: torch.Tensor | None = None

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_name: cache},
            **self._keep_last,
        )
        out = self.model(**kwargs)
        return out.logits[:, -1, :].float(), output_cache(out)

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
def eval_mode(models: Sequence[torch.nn.Module]):
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


def combine_logits(base: torch.Tensor, second: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1 - alpha) * l_base + alpha * l_second in float32: the same line as l_b + alpha (l_s - l_b),
    written so that alpha = 0 and alpha = 1 return exactly l_base and l_second."""
    base, second = base.float(), second.float()
    if alpha == 0:
        return base
    if alpha == 1:
        return second
    return (1.0 - alpha) * base + alpha * second


class ExtrapolatedSource:
    """A LogitsSource over two models with their own KV caches; finished rows leave both."""

    def __init__(self, base_model: torch.nn.Module, second_model: torch.nn.Module, alpha: float):
        self.base = ModelSource(base_model)
        self.second = ModelSource(second_model)
        if self.base.vocab_size != self.second.vocab_size:
            raise UsageError(
                f"cannot extrapolate logits: base model vocabulary has {self.base.vocab_size} tokens, "
                f"second model has {self.second.vocab_size}; use two checkpoints of the same model"
            )
        self.alpha = float(alpha)
        self.models = [base_model, second_model]
        self.device = self.base.device
        self.vocab_size = self.base.vocab_size
        limits = [m for m in (self.base.max_positions, self.second.max_positions) if m is not None]
        self.max_positions = min(limits) if limits else None
        self.eos_token_ids = tuple(sorted(set(self.base.eos_token_ids) | set(self.second.eos_token_ids)))

    def _combine(self, base_logits, second_logits):
        return combine_logits(base_logits, second_logits.to(self.device), self.alpha)

    def prefill(self, input_ids, attention_mask, row_map=None):
        base_logits = self.base.prefill(input_ids, attention_mask, row_map)
        second_logits = self.second.prefill(input_ids, attention_mask, row_map)
        return self._combine(base_logits, second_logits)

    def step(self, next_tokens, keep_rows=None):
        base_logits = self.base.step(next_tokens, keep_rows)
        second_logits = self.second.step(next_tokens, keep_rows)
        return self._combine(base_logits, second_logits)

    def close(self):
        self.base.close()
        self.second.close()
