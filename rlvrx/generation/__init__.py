"""Generation engine: batched KV-cache sampling, two-model logits extrapolation, teacher-forced scoring."""

from rlvrx.generation.decode import generate, left_pad
from rlvrx.generation.logits import process_logits
from rlvrx.generation.params import Generation, SamplingParams
from rlvrx.generation.sources import (
    ExtrapolatedSource,
    LogitsSource,
    ModelSource,
    combine_logits,
    model_max_positions,
    model_vocab_size,
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
