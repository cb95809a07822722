"""Models: the one place a checkpoint directory becomes a (model, tokenizer) pair, the one check of a
device the caller names, and the default dtype per device.

Plain parameters only (a path, a device name, a dtype): the trainer, eval, logits extrapolation and
the log-prob probes all load through here. Errors name the parameter they are about (`device`, or
the name the caller passes, e.g. the recipe key `model.device`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rlvrx.errors import CheckpointError, UsageError

__all__ = [
    "check_device",
    "check_weights",
    "context_length",
    "cuda_available",
    "default_dtype",
    "load_model",
    "load_pretrained",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ------------------------------------------------------------------------------------------------
# Devices and dtypes


def cuda_available() -> bool:
    return torch.cuda.is_available()


def check_device(device: str, option: str = "device") -> str:
    """`device` when it is a torch device this machine has, else a one-line UsageError naming
    `option` (the parameter, recipe key or flag the value came from)."""
    fix = f"{option} cpu" if option.startswith("-") else f"{option}=cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"{option} {device}: not a torch device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {device}: no CUDA device is visible; use {fix}")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def resolve_device(device: str = "auto", option: str = "device") -> torch.device:
    """'auto' -> cuda when a GPU is visible, else cpu; any other name checked (check_device)."""
    if device == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    return torch.device(check_device(device, option))


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on a GPU, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def resolve_dtype(dtype: str | None, device: torch.device | str) -> torch.dtype:
    """A dtype name ('bf16', 'float32', ...) -> torch dtype; None -> default_dtype(device)."""
    from rlvrx.io.dtypes import parse_dtype

    return parse_dtype(dtype) if dtype else default_dtype(device)


# ------------------------------------------------------------------------------------------------
# Checkpoints


def check_weights(path: str | os.PathLike) -> None:
    """The checkpoint's safetensors headers read and checked against the file sizes: a CheckpointError
    naming the file for an empty, garbage or truncated file, or a directory with only .bin weights."""
    from rlvrx.io.reader import Checkpoint

    with Checkpoint(path) as checkpoint:
        checkpoint.infos()


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved beside the weights (pad token = eos when it has none)."""
    from transformers import AutoTokenizer

    path = Path(path)
    _check_tokenizer_files(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # tokenizers raises bare Exceptions for a damaged tokenizer.json
        raise UsageError(f"{path}: cannot load the tokenizer ({_first_line(exc)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """The causal LM of a checkpoint directory on `device` in `dtype` (eval mode). A damaged weights file
    or a directory transformers cannot load is a CheckpointError naming it."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from rlvrx.io.reader import Checkpoint

    check_device(str(device))
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"model path {path} is not a directory")
    Checkpoint(path).infos()  # a damaged weights file: one line naming it, before transformers reads it
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot load the model ({_first_line(exc)})") from None
    return model.to(device).eval()  # type: ignore[arg-type]  # transformers types .to() through a decorator


def load_pretrained(path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a checkpoint directory, the model on `device` in `dtype`."""
    path = Path(path)
    if path.is_dir():
        _check_tokenizer_files(path)  # before the (slower) model load
    model = load_model(path, device, dtype)
    return model, load_tokenizer(path)


def context_length(path: str | os.PathLike) -> int | None:
    """The model's max_position_embeddings from its config.json (None when it has none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def _check_tokenizer_files(path: Path) -> None:
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json); save the tokenizer next to the weights")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
