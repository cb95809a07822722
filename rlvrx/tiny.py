"""A tiny Qwen2-style causal LM and a character-level tokenizer, built locally (no downloads)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch

from rlvrx.io.atomic import atomic_dir

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = [PAD, BOS, EOS]
# Printable ASCII (digits and operators first, so arithmetic ids are small and stable).
CHARACTERS = list("0123456789+-*/=()., ") + [c for c in string.printable if c not in "0123456789+-*/=()., \t\n\r\x0b\x0c"] + ["\n"]


def char_tokenizer():
    """A Qwen2Tokenizer whose byte-level BPE has no merges: one token per character, plus <pad> <bos> <eos>.

    Being a real Qwen2Tokenizer, it round-trips through `AutoTokenizer.from_pretrained` (transformers
    forces that class for Qwen2 checkpoints). The tokenizer adds no BOS itself: prompts carry `<bos>`.
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_char = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for char in CHARACTERS:
        vocab[byte_char[ord(char)]] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        model_max_length=1 << 16,
    )


def tiny_config(vocab_size: int, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=256, max_position=128, tie_embeddings=True, **ids):
    from transformers import Qwen2Config

    sizes = dict(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, intermediate=intermediate, max_position=max_position)
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1 (got {value})")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be divisible by kv_heads ({kv_heads})")
    if (hidden // heads) % 2:
        raise ValueError(f"the head size hidden/heads ({hidden // heads}) must be even for rotary embeddings")
    return Qwen2Config(  # type: ignore[call-arg]  # rope_theta: a parameter before transformers 5, a kwarg it maps since
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=tie_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        **ids,
    )


def build_tiny_model(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=256, max_position=128, tie_embeddings=True, seed=0):
    """(model, tokenizer): a randomly initialised Qwen2ForCausalLM (float32) and its char tokenizer."""
    from transformers import Qwen2ForCausalLM

    tokenizer = char_tokenizer()
    config = tiny_config(
        len(tokenizer),
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        max_position=max_position,
        tie_embeddings=tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    devnull_rng = torch.random.fork_rng(devices=[])
    with devnull_rng:
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_tiny_model(out: str | os.PathLike, overwrite: bool = False, **kwargs) -> Path:
    """Build a tiny model and save it as a normal HF checkpoint dir (safetensors + tokenizer)."""
    model, tokenizer = build_tiny_model(**kwargs)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)
