"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.generation.sources import ExtrapolatedSource, combine_logits

__all__ = ["ExtrapolatedSource", "combine_logits"]
