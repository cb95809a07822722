"""The one check of a device a user names (`--device`, `model.device`): a torch device this machine
has, or a one-line UsageError naming the option."""

from __future__ import annotations

from rlvrx.errors import UsageError


def check_device(device: str, option: str = "--device") -> str:
    import torch

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

