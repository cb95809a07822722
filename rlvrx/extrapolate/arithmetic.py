"""The per-tensor arithmetic of weight extrapolation: which tensors the compiled kernel computes, the
torch path (two-point through rlvrx.formulas.jump, least squares as a combination), and the check that
no result holds inf/nan."""

from __future__ import annotations

import contextlib
import math
import os
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from rlvrx import kernels
from rlvrx.errors import RlvrxError
from rlvrx.extrapolate.options import Source
from rlvrx.formulas import jump
from rlvrx.io.dtypes import RawValues, dtype_name

if TYPE_CHECKING:
    import torch


def native_kind(method: str, precise: bool, in_name: str, out_name: str) -> int | None:
    """The compiled kernel's storage kind when it computes this tensor (two-point, bf16 or fp32 in
    and out): torch.lerp's result bit for bit, without importing torch; None for the torch path."""
    if method == "two-point" and not precise and in_name == out_name and in_name in ("BF16", "F32") and kernels.available():
        return kernels.RAW_KINDS[in_name]
    return None


def compute_dtype(dtype: torch.dtype, precise: bool) -> torch.dtype:
    import torch

    return torch.float64 if precise or dtype == torch.float64 else torch.float32


def combine_into(out: torch.Tensor, tensors: Sequence[torch.Tensor], coefficients: Sequence[float], compute: torch.dtype) -> torch.Tensor:
    """out = sum_k c_k T_k (sum c_k = 1), as T_ref + sum_k c_k (T_k - T_ref) with ref = the last tensor."""
    import torch

    ref = len(tensors) - 1
    ref_c = tensors[ref].to(compute)
    acc = ref_c.clone()
    diff = torch.empty_like(acc)
    for k, c in enumerate(coefficients):
        if k == ref or c == 0:
            continue
        diff.copy_(tensors[k])
        diff.sub_(ref_c)
        acc.add_(diff, alpha=c)
    return out.copy_(acc)


def _chunked(fill: Callable[[torch.Tensor, slice], object], shape, out_dtype: torch.dtype, chunk: int) -> torch.Tensor:
    import torch

    out = torch.empty(shape, dtype=out_dtype)
    flat = out.view(-1)
    for i in range(0, flat.numel(), chunk):
        part = slice(i, min(flat.numel(), i + chunk))
        fill(flat[part], part)
    return out


def lerp_tensor(base: torch.Tensor, second: torch.Tensor, alpha: float, out_dtype: torch.dtype, compute: torch.dtype, chunk: int = 1 << 22) -> torch.Tensor:
    """base + alpha (second - base) in `compute` precision (rlvrx.formulas.jump), returned in out_dtype."""
    b, s = base.reshape(-1), second.reshape(-1)
    return _chunked(lambda out, part: jump(b[part], s[part], alpha, compute=compute, out=out), base.shape, out_dtype, chunk)


def combine_tensor(
    tensors: Sequence[torch.Tensor], coefficients: Sequence[float], out_dtype: torch.dtype, compute: torch.dtype, chunk: int = 1 << 22
) -> torch.Tensor:
    """sum_k c_k T_k (sum c_k = 1), as T_ref + sum_k c_k (T_k - T_ref) with ref = the last tensor."""
    flats = [t.reshape(-1) for t in tensors]
    return _chunked(lambda out, part: combine_into(out, [f[part] for f in flats], coefficients, compute), tensors[-1].shape, out_dtype, chunk)


def all_finite(tensor: torch.Tensor) -> bool:
    """One vectorised reduction, no bool-tensor allocation: a finite sum proves every value finite
    (an inf or nan term makes any float sum inf or nan); only a non-finite sum (a bad value, or an
    overflowing sum of finite ones) takes the exact aminmax check."""
    import torch

    if tensor.numel() == 0:
        return True
    try:
        if math.isfinite(float(tensor.sum())):
            return True
    except (RuntimeError, NotImplementedError):
        pass
    try:
        low, high = torch.aminmax(tensor)
    except (RuntimeError, NotImplementedError):  # dtypes without aminmax (float8)
        return all(bool(torch.isfinite(part.float()).all()) for part in tensor.reshape(-1).split(1 << 22))
    return math.isfinite(float(low)) and math.isfinite(float(high))


def check_finite(name: str, tensor: torch.Tensor, inputs: Sequence[tuple[Source, torch.Tensor]]) -> None:
    if all_finite(tensor):
        return
    bad = [str(src.path) for src, t in inputs if not all_finite(t)]
    cause = f"{bad[0]} already holds inf/nan there" if bad else f"the result overflows {dtype_name(tensor.dtype)} (try --dtype float32)"
    raise RlvrxError(f"tensor {name}: extrapolation produced inf/nan values; {cause}")


@contextlib.contextmanager
def torch_threads(requested: int | None, helpers: int):
    """Leave a core to each helper thread (writer, hasher): oversubscribed OpenMP threads are slower
    than fewer threads on a busy machine."""
    import torch

    before = torch.get_num_threads()
    if requested is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cores = os.cpu_count() or 1
        requested = min(before, max(1, cores - helpers))
    torch.set_num_threads(max(1, requested))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_dtype(name: str) -> torch.dtype:
    from rlvrx.io.dtypes import torch_dtypes

    return torch_dtypes()[name]


def raise_non_finite(name: str, out: RawValues, inputs: Sequence[RawValues], sources: Sequence[Source]) -> None:
    """The kernel counted inf/nan in its output: the same error as the torch path's check."""
    import torch

    def as_torch(values: RawValues) -> torch.Tensor:
        return torch.from_numpy(np.array(values.data)).view(torch_dtype(values.dtype_name))

    check_finite(name, as_torch(out), [(src, as_torch(v)) for src, v in zip(sources, inputs)])
