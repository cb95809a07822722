"""rlvrx's compiled kernels (rlvrx/_native.c), loaded once and called through ctypes.

ctypes releases the GIL for the duration of a call, so threads run kernels in parallel. The
extension is built by pip from the C source; without it the commands that need it say how to fix that.
"""

from __future__ import annotations

import ctypes
import functools

from rlvrx.errors import RlvrxError

# _native.c's RAW_* storage kinds
RAW_KINDS = {"BF16": 0, "F32": 1, "F64": 2, "F8_E4M3": 3, "F8_E5M2": 3, "F16": 4}


@functools.cache
def library() -> ctypes.CDLL:
    import importlib.util

    spec = importlib.util.find_spec("rlvrx._native")
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
