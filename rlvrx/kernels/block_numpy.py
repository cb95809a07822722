"""The weight-linearity block reducer in numpy: rlvrx_weight_block (rlvrx/kernels/_native_block.h) for installs
without the compiled kernels, with the same outputs.

Each parameter's arithmetic is the kernel's, operation for operation in float64 (no fused multiply-add
in either), so R², counts, kept values and histogram bins are the same bits. The sums over parameters
follow the kernel's order: four accumulators, parameter p into accumulator p % 4 in parameter order
(np.cumsum is strictly sequential), then (a0 + a1) + (a2 + a3).
"""

from __future__ import annotations

import numpy as np

_CHUNK_VALUES = 1 << 20  # float64 values of one chunk's (K, chunk) arrays: a few of them alive at once


def _widen(row: np.ndarray, kind: int, lut: np.ndarray | None) -> np.ndarray:
    """Raw stored values as float64 (_native.c's widen; kinds are rlvrx.kernels.RAW_KINDS)."""
    if kind == 0:  # bf16: the high half of a float32
        return (row.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if kind in (3, 4):
        if lut is None:
            raise ValueError(f"raw kind {kind} (fp8, fp16) needs its lookup table")
        return lut[row.view(np.uint8 if row.itemsize == 1 else np.uint16)]
    return row.astype(np.float64)


def _distinct(y: np.ndarray) -> np.ndarray:
    """Distinct values per column, compared as float64: -0 == +0, a NaN equal to nothing."""
    s = np.sort(y, axis=0)  # NaNs last
    return 1 + np.count_nonzero(s[1:] != s[:-1], axis=0)


def _accumulate4(acc: np.ndarray, v: np.ndarray) -> None:
    """acc (4,) += v's values four lanes at a time, in order (v's length is a multiple of 4)."""
    acc[:] = np.cumsum(np.vstack([acc[None, :], v.reshape(-1, 4)]), axis=0)[-1]


def weight_block(
    rows,
    kind: int,
    lut,
    k: int,
    tc: np.ndarray,
    s_tt: float,
    holdout: np.ndarray,
    min_abs_change: float,
    min_unique: int,
    thresholds: np.ndarray,
    bins: int,
    hist: np.ndarray | None,
    want_values: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """counts (int64[7]), sums (float64[2K]) and the kept R² (or None) of rows (K arrays of n raw values);
    hist accumulates the kept R²'s bins. The arguments and outputs are rlvrx_weight_block's."""
    with np.errstate(all="ignore"):  # non-finite values are counted; the caller refuses such blocks
        return _reduce(rows, kind, lut, k, tc, s_tt, holdout, min_abs_change, min_unique, thresholds, bins, hist, want_values)


def _centered(y: np.ndarray, k: int, tc: np.ndarray, holdout: np.ndarray):
    """mean, centred values, S_ty, S_yy and the held-out error of each column of y (K, n)."""
    mean = np.zeros(y.shape[1])
    for j in range(k):
        mean += y[j]
    mean /= float(k)
    c = y - mean
    sty, syy, err = np.zeros(y.shape[1]), np.zeros(y.shape[1]), np.zeros(y.shape[1])
    for j in range(k):
        sty += tc[j] * c[j]
        syy += c[j] * c[j]
        err += holdout[j] * c[j]
    return mean, c, sty, syy, err


def _classify(y, c, sty, syy, s_tt, min_abs_change, min_unique, wide_limit):
    """The filters (constant, max - min below min_abs_change, too few distinct values; each parameter under
    the first it fails), the kept mask and every column's clamped R²."""
    m = y.shape[1]
    if min_unique > 1:
        distinct = _distinct(y)
        constant, few = distinct == 1, distinct < min_unique
    else:
        constant, few = (y == y[0]).all(axis=0), np.zeros(m, dtype=bool)
    constant |= syy <= 0.0
    open_ = ~constant
    small = np.zeros(m, dtype=bool)
    if min_abs_change > 0.0:
        narrow = open_ & ~(syy > wide_limit)
        small = narrow & (c.max(axis=0) - c.min(axis=0) < min_abs_change)
    open_ &= ~small
    few &= open_
    keep = open_ & ~few
    r2 = sty * sty / (syy * s_tt)
    r2 = np.where(r2 > 1.0, 1.0, r2)
    r2 = np.where(r2 < 0.0, 0.0, r2)
    return constant, small, few, keep, r2


def parameter_detail(
    rows, kind: int, lut, k: int, tc: np.ndarray, s_tt: float, holdout: np.ndarray, min_abs_change: float, min_unique: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per parameter of rows (K arrays of n raw values): its K values as float64 (n, K), its R² (NaN when
    filtered) and why it was filtered (FILTER_CODES); the arithmetic is weight_block's."""
    with np.errstate(all="ignore"):
        y = np.stack([_widen(r, kind, lut) for r in rows])
        _, c, sty, syy, _ = _centered(y, k, tc, holdout)
        wide_limit = k * (min_abs_change * 1.001) * (min_abs_change * 1.001)
        constant, small, few, keep, r2 = _classify(y, c, sty, syy, s_tt, min_abs_change, min_unique, wide_limit)
    code = np.zeros(y.shape[1], dtype=np.int8)
    code[few] = 3
    code[small] = 2
    code[constant] = 1
    return np.ascontiguousarray(y.T), np.where(keep, r2, np.nan), code


FILTER_CODES = {0: "kept", 1: "constant", 2: "min_abs_change", 3: "min_unique"}


def _reduce(rows, kind, lut, k, tc, s_tt, holdout, min_abs_change, min_unique, thresholds, bins, hist, want_values):
    n = len(rows[0])
    counts = np.zeros(7, dtype=np.int64)
    acc = np.zeros((2 * k, 4))
    kept_values = []
    wide_limit = k * (min_abs_change * 1.001) * (min_abs_change * 1.001)
    chunk = max(4, _CHUNK_VALUES // k // 4 * 4)
    for p0 in range(0, n, chunk):
        m = min(chunk, n - p0)
        padded = (m + 3) // 4 * 4
        y = np.zeros((k, padded))
        for j in range(k):
            y[j, :m] = _widen(rows[j][p0 : p0 + m], kind, lut)
        mean, c, sty, syy, err = _centered(y, k, tc, holdout)
        _accumulate4(acc[1], err * err)
        whole = y[k - 1] - y[0]
        _accumulate4(acc[2], whole * whole)
        d = y[1:] - y[:-1]
        for j in range(k - 1):
            _accumulate4(acc[3 + j], d[j] * d[j])
            if j:
                _accumulate4(acc[k + 1 + j], d[j - 1] * d[j])
        y, mean, c, sty, syy = y[:, :m], mean[:m], c[:, :m], sty[:m], syy[:m]
        constant, small, few, keep, r2 = _classify(y, c, sty, syy, s_tt, min_abs_change, min_unique, wide_limit)
        bad = ~(mean - mean == 0.0)
        counts += [constant.sum(), small.sum(), few.sum(), keep.sum(), (keep & (r2 > thresholds[0])).sum(), (keep & (r2 > thresholds[1])).sum(), bad.sum()]
        r2_kept = np.zeros(padded)
        r2_kept[:m] = np.where(keep, r2, 0.0)
        _accumulate4(acc[0], r2_kept)
        if hist is not None:
            scaled = r2[keep] * float(bins)
            bin_ = np.minimum(np.where(scaled == scaled, scaled, 0.0).astype(np.int32), bins - 1)
            hist += np.bincount(bin_, minlength=bins).astype(np.int64)
        if want_values:
            kept_values.append(r2[keep])
    sums = (acc[:, 0] + acc[:, 1]) + (acc[:, 2] + acc[:, 3])
    values = (np.concatenate(kept_values) if kept_values else np.zeros(0)) if want_values else None
    return counts, sums, values
