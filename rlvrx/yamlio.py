"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.io.yamlio import load_yaml, read_yaml_file

__all__ = ["load_yaml", "read_yaml_file"]
