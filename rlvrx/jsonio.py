"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.io.jsonio import iter_jsonl, read_json, read_jsonl

__all__ = ["iter_jsonl", "read_json", "read_jsonl"]
