"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from __future__ import annotations

from rlvrx import models


def check_device(device: str, option: str = "--device") -> str:
    """rlvrx.models.check_device with this module's old default option (the --device flag)."""
    return models.check_device(device, option)


__all__ = ["check_device"]
