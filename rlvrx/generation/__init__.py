"""Generation engine: batched KV-cache sampling, two-model logits extrapolation, teacher-forced scoring."""

from rlvrx.generation.logits_extrapolation import ExtrapolatedSource, combine_logits
from rlvrx.generation.sampler import (
    Generation,
    LogitsSource,
    ModelSource,
    SamplingParams,
    generate,
    left_pad,
    model_max_positions,
    model_vocab_size,
    process_logits,
)
from rlvrx.generation.scoring import (
    PackedBatch,
    pack_prompt_response,
    ResponseScores,
    batch_token_logprobs,
    positions_from_mask,
    score_responses,
    shared_prompt_token_logprobs,
    token_logprobs,
)

__all__ = [
    "ExtrapolatedSource",
    "Generation",
    "LogitsSource",
    "ModelSource",
    "PackedBatch",
    "ResponseScores",
    "SamplingParams",
    "batch_token_logprobs",
    "combine_logits",
    "generate",
    "left_pad",
    "model_max_positions",
    "model_vocab_size",
    "pack_prompt_response",
    "positions_from_mask",
    "process_logits",
    "score_responses",
    "shared_prompt_token_logprobs",
    "token_logprobs",
]
