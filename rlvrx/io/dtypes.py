"""safetensors dtypes: sizes, names, their torch dtypes (made on first use, so importing this does not
import torch), and the tensor descriptions read from checkpoint headers."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rlvrx.errors import UsageError

if TYPE_CHECKING:
    import torch

# safetensors dtype -> (bytes per element, torch dtype name)
DTYPE_INFO = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_BY_STR = ("float64", "float32", "float16", "bfloat16")


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors name -> torch dtype, made on first use so that importing this module does not import torch."""
    import torch

    return {key: getattr(torch, torch_name) for key, (_, torch_name) in DTYPE_INFO.items()}


@functools.cache
def torch_dtype_names() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors name (the reverse of torch_dtypes)."""
    return {v: k for k, v in torch_dtypes().items()}


def parse_dtype(name: str) -> torch.dtype:
    """'bfloat16', 'bf16', 'BF16', 'float32'... -> torch dtype."""
    key = name.strip()
    if key.upper() in DTYPE_INFO:
        return torch_dtypes()[key.upper()]
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32", "fp64": "float64", "double": "float64"}
    key = aliases.get(key.lower(), key.lower())
    if key not in _BY_STR:
        raise UsageError(f"unknown dtype {name!r}: use one of {', '.join(_BY_STR)}")
    import torch

    return getattr(torch, key)


def dtype_name(dtype: torch.dtype | str) -> str:
    """safetensors' name of a torch dtype; names ("BF16", ...) pass through."""
    return dtype if isinstance(dtype, str) else torch_dtype_names()[dtype]


def element_size(dtype: torch.dtype | str) -> int:
    return DTYPE_INFO[dtype][0] if isinstance(dtype, str) else dtype.itemsize


@dataclass(frozen=True)
class RawValues:
    """A tensor's stored values without torch: `data` holds their bit patterns in a flat numpy array
    (bf16 and fp16 as uint16, fp8 as uint8), e.g. a view of a memory-mapped file or a kernel's output."""

    dtype_name: str
    data: np.ndarray


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype_name: str  # safetensors' name: "BF16", "F32", ...
    file: Path
    offset: int = 0  # of the tensor's first byte in the file

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtypes()[self.dtype_name]

    @property
    def is_float(self) -> bool:
        return self.dtype_name in FLOAT_DTYPES

    @property
    def itemsize(self) -> int:
        return DTYPE_INFO[self.dtype_name][0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize
