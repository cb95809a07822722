"""Logits extrapolation: two models decode in lockstep, l = l_base + alpha * (l_second - l_base).

Plug an `ExtrapolatedSource` into `rlvrx.generation.generate`; temperature / top-k / top-p and
sampling then apply to the combined logits, and `raw_logprobs` are under softmax(l).
"""

from __future__ import annotations

import torch

from rlvrx.errors import UsageError
from rlvrx.generation.sampler import ModelSource


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
