"""Per-parameter dump of chosen tensors: every parameter's values over the steps, its R² and its filter.

One .npz (written atomically, streamed block by block, so memory stays at one block of K checkpoints):
- "steps": int64 (K,);
- per matching tensor NAME: "NAME/values" float64 (numel, K), the values as read (cast to bfloat16 first
  with read_dtype); "NAME/r2" float64 (numel,), NaN where filtered; "NAME/filter" int8 (numel,), the
  code of the filter it failed ("filter_codes" names them: 0 kept, 1 constant, 2 min_abs_change, 3 min_unique).
The R² and filters are the weight kernel's, parameter for parameter (block_numpy.parameter_detail).
Every parameter of a matching tensor is dumped, whatever `sample` says.
"""

from __future__ import annotations

import os
import zipfile
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from rlvrx.io.atomic import atomic_file
from rlvrx.io.reader import Checkpoint
from rlvrx.kernels import RAW_KINDS, block_numpy
from rlvrx.linearity import stats
from rlvrx.linearity.kernel import lookup_table, cast_on_read
from rlvrx.linearity.plan import block_elements, matching_tensors, open_checked

if TYPE_CHECKING:
    from rlvrx.linearity.weights import WeightSettings


def _write_member(archive: zipfile.ZipFile, name: str, dtype: str, shape: tuple, blocks) -> None:
    """One .npy member of shape `shape`, its C-order bytes written block by block."""
    with archive.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
        for block in blocks:
            f.write(np.ascontiguousarray(block, dtype=dtype).tobytes())


def dump_parameters(
    checkpoints: Sequence[tuple[int, Checkpoint]],
    patterns: Sequence[str],
    path: str | os.PathLike,
    settings: WeightSettings,
    progress: Callable[[str, int], None] | None = None,
) -> list[str]:
    """Write the dump of the tensors matching any of `patterns` to `path`; returns their names."""
    steps, ckpts = open_checked(checkpoints)
    infos = ckpts[0].infos()
    names = matching_tensors(infos, patterns, "--dump-params")
    k = len(steps)
    tc = stats.centered_steps(steps)
    s_tt = float(tc @ tc)
    holdout = stats.holdout_vector(steps)
    per_block = block_elements(k, 8, settings.memory_mb)
    if settings.max_block_elements is not None:
        per_block = max(1, min(per_block, settings.max_block_elements))

    def details(name: str):
        dtype, cast = cast_on_read(infos[name].dtype_name, settings.read_dtype)
        lut = lookup_table(dtype)
        views = [c.raw(name).data for c in ckpts]
        numel = infos[name].numel
        for lo in range(0, numel, per_block):
            rows = [v[lo : lo + per_block] for v in views]
            if cast is not None:
                rows = [cast(r) for r in rows]
            yield block_numpy.parameter_detail(rows, RAW_KINDS[dtype], lut, k, tc, s_tt, holdout, float(settings.min_abs_change), settings.min_unique)

    with atomic_file(path) as tmp:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
            _write_member(archive, "steps", "<i8", (k,), [np.asarray(steps, dtype=np.int64)])
            reasons = [block_numpy.FILTER_CODES[c] for c in sorted(block_numpy.FILTER_CODES)]
            _write_member(archive, "filter_codes", "<U16", (len(reasons),), [np.array(reasons, dtype="<U16")])
            for name in names:
                numel = infos[name].numel
                _write_member(archive, f"{name}/values", "<f8", (numel, k), (d[0] for d in details(name)))
                _write_member(archive, f"{name}/r2", "<f8", (numel,), (d[1] for d in details(name)))
                _write_member(archive, f"{name}/filter", "<i1", (numel,), (d[2] for d in details(name)))
                if progress is not None:
                    progress(name, numel)
    return names
