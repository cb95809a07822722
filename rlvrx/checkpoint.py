"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.io import dtypes as _dtypes
from rlvrx.io.atomic import atomic_dir, atomic_file, atomic_write_text, check_replaceable, recover
from rlvrx.io.dtypes import DTYPE_INFO, FLOAT_DTYPES, RawValues, TensorInfo, dtype_name, element_size, parse_dtype
from rlvrx.io.identity import checkpoint_sha256, compare_structure, weight_files
from rlvrx.io.reader import AUX_FILES, INDEX_NAME, SINGLE_NAME, Checkpoint, is_checkpoint_dir, load_torch_file, read_header
from rlvrx.io.writer import ShardedWriter, copy_aux_files, save_state_dict, write_checkpoint

__all__ = [
    "AUX_FILES", "DTYPE_INFO", "FLOAT_DTYPES", "INDEX_NAME", "SINGLE_NAME", "Checkpoint", "RawValues", "ShardedWriter",
    "TensorInfo", "atomic_dir", "atomic_file", "atomic_write_text", "check_replaceable", "checkpoint_sha256",
    "compare_structure", "copy_aux_files", "dtype_name", "element_size", "is_checkpoint_dir", "load_torch_file",
    "parse_dtype", "read_header", "recover", "save_state_dict", "weight_files", "write_checkpoint",
]


def __getattr__(name: str):
    """DTYPES, DTYPE_NAMES (they import torch): now rlvrx.io.dtypes.torch_dtypes() and torch_dtype_names()."""
    if name == "DTYPES":
        return _dtypes.torch_dtypes()
    if name == "DTYPE_NAMES":
        return _dtypes.torch_dtype_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
