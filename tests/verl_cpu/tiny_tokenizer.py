"""verl and rlvrx's character tokenizer (shared by the CPU plugin here and benchmarks/gpu_check.sh).

verl maps model_type qwen2 to its Qwen chat-boundary builder, which needs Qwen's `<|im_end|>`; the
tiny character tokenizer has none, so for a tokenizer without it verl's default builder is used.
Tokenizers that have it are left to verl's own choice.
"""

from __future__ import annotations


def patch_continuous_token() -> None:
    try:
        from verl.utils.tokenizer import continuous_token_wiring as wiring
    except ImportError:
        return
    original = wiring.create_continuous_token_builder
    if getattr(original, "_rlvrx_gated", False):
        return

    def create_builder(tokenizer, *args, model_family="auto", **kwargs):
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        if model_family == "auto" and "<|im_end|>" not in vocab:
            model_family = "default"
        return original(tokenizer, *args, model_family=model_family, **kwargs)

    create_builder._rlvrx_gated = True
    wiring.create_continuous_token_builder = create_builder
