"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.kernels.block_numpy import weight_block

__all__ = ["weight_block"]
