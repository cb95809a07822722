"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.generation.decode import NonFiniteLogits, generate, left_pad
from rlvrx.generation.logits import process_logits
from rlvrx.generation.params import Generation, SamplingParams
from rlvrx.generation.sources import LogitsSource, ModelSource, keep_logits_kwargs, model_max_positions, model_vocab_size

__all__ = [
    "Generation",
    "LogitsSource",
    "ModelSource",
    "NonFiniteLogits",
    "SamplingParams",
    "generate",
    "keep_logits_kwargs",
    "left_pad",
    "model_max_positions",
    "model_vocab_size",
    "process_logits",
]
