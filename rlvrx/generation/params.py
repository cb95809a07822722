"""Sampling settings (`SamplingParams`) and the record of one sampled completion (`Generation`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlvrx.errors import UsageError

__all__ = ["SamplingParams", "Generation"]


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
