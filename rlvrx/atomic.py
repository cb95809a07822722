"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.io.atomic import atomic_dir, atomic_file, atomic_write_text, check_replaceable, recover, recover_file

__all__ = ["atomic_dir", "atomic_file", "atomic_write_text", "check_replaceable", "recover", "recover_file"]
