"""A tiny random Qwen2 causal LM in memory (no tokenizer, no files) for the sampler and scoring tests."""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

VOCAB = 40


def tiny_qwen(seed: int = 0, vocab: int = VOCAB, max_position: int = 128) -> Qwen2ForCausalLM:
    """initializer_range 0.3 makes next-token distributions peaked: greedy has no near-ties, and two
    seeds' models disagree visibly (logits extrapolation)."""
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position,
        tie_word_embeddings=True,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).eval()
