"""rlvrx's compiled kernels (rlvrx/kernels/_native.c), loaded once and called through ctypes.

ctypes releases the GIL for the duration of a call, so threads run kernels in parallel. The
extension is optional: pip builds it where a C compiler is available (not MSVC: the kernels use GCC/Clang
vector extensions); without it weight linearity uses a numpy block reducer (rlvrx.kernels.block_numpy)
and extrapolation torch.lerp, with the same results, more slowly (available() says which, and warns once).
RLVRX_KERNELS=0 in the environment uses the fallback where the kernels are built.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

from rlvrx.errors import RlvrxError

# _native.c's RAW_* storage kinds
RAW_KINDS = {"BF16": 0, "F32": 1, "F64": 2, "F8_E4M3": 3, "F8_E5M2": 3, "F16": 4}


@functools.cache
def available() -> bool:
    """Whether the compiled kernels are in use; when they are not, one warning on stderr."""
    import importlib.util

    if os.environ.get("RLVRX_KERNELS") == "0":
        why = "RLVRX_KERNELS=0"
    else:
        spec = importlib.util.find_spec("rlvrx.kernels._native")
        if spec is not None and spec.origin is not None:
            return True
        why = "not built: no C compiler at install"
    sys.stderr.write(f"warning: rlvrx's compiled kernels are off ({why}); using the slower numpy/torch.lerp fallback, with the same results\n")
    return False


@functools.cache
def library() -> ctypes.CDLL:
    import importlib.util

    spec = importlib.util.find_spec("rlvrx.kernels._native")
    if spec is None or spec.origin is None:
        raise RlvrxError("rlvrx's compiled kernels are missing; reinstall rlvrx where a C compiler is available (pip install -e .)")
    lib = ctypes.CDLL(spec.origin)
    ptr, i64, dbl, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
    for block in (lib.rlvrx_weight_block, lib.rlvrx_weight_block_4):  # _4: the 4-lane build, whatever the CPU
        block.argtypes = [ptr, cint, ptr, i64, cint, ptr, dbl, ptr, dbl, cint, ptr, i64, ptr, ptr, ptr, ptr]
        block.restype = cint
    lib.rlvrx_weight_block_lanes.restype = cint
    lib.rlvrx_lerp.argtypes = [cint, ptr, ptr, dbl, ptr, i64]
    lib.rlvrx_lerp.restype = i64
    return lib
