"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.kernels import RAW_KINDS, available, library

__all__ = ["RAW_KINDS", "available", "library"]
