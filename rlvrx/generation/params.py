"""Sampling settings: one decode call's (`SamplingParams`), a model run's with its device defaults
(`Sampling`, `resolve_sampling`: the paper's on a GPU, n = 64 samples, temperature 0.6, top-p 0.95,
max 32768 new tokens; small ones on CPU, n = 4, max 256; a task with a natural answer length, e.g.
arithmetic, uses that as its max on both), and the record of one sampled completion (`Generation`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from rlvrx.errors import UsageError

__all__ = ["CPU_DEFAULTS", "GPU_DEFAULTS", "Generation", "Sampling", "SamplingParams", "resolve_sampling"]


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


GPU_DEFAULTS = {"n": 64, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768}
CPU_DEFAULTS = {"n": 4, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 256}


@dataclass(frozen=True)
class Sampling:
    """What a model run samples with; `origin` says where the values came from (for the report)."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int = 0
    origin: str = "given"

    def key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "origin"}

    def describe(self) -> str:
        return (
            f"n={self.n} samples, temperature {self.temperature:g}, top-p {self.top_p:g}, "
            f"max {self.max_new_tokens} new tokens, seed {self.seed} ({self.origin})"
        )

    def params(self):
        """The SamplingParams of one generate call."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens, seed=self.seed)


def resolve_sampling(
    *,
    gpu: bool,
    task_name: str,
    task_max_new_tokens: int | None = None,
    n: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    max_new_tokens: int | None = None,
    seed: int = 0,
) -> Sampling:
    """The given values, the rest from the defaults for the device (and the task's answer length)."""
    defaults = dict(GPU_DEFAULTS if gpu else CPU_DEFAULTS)
    if task_max_new_tokens is not None:
        defaults["max_new_tokens"] = task_max_new_tokens
    values_given = {"n": n, "temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens}
    given = {k: v for k, v in values_given.items() if v is not None}
    values = {**defaults, **given}
    if len(given) == len(defaults):
        origin = "given"
    else:
        origin = ("GPU defaults (the paper's)" if gpu else "CPU defaults") + (
            f", {task_name} answer length" if task_max_new_tokens is not None and "max_new_tokens" not in given else ""
        )
        if given:
            origin += f"; given: {', '.join(given)}"
    SamplingParams(temperature=values["temperature"], top_p=values["top_p"], max_new_tokens=values["max_new_tokens"])  # validates
    return Sampling(values["n"], float(values["temperature"]), float(values["top_p"]), int(values["max_new_tokens"]), seed, origin)
