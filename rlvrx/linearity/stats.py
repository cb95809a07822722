"""Statistics shared by weight and log-prob linearity: per-column R² against step, fixed-bin histograms.

The regression math here runs in float64 on a [K, n] block (K checkpoints, n series), a few numpy
vector operations for millions of series (weight linearity has its own compiled kernel, see
weights.py, with the same formulas).

R² of a series y against steps t is the squared Pearson correlation, which equals the OLS R² of
y = a + b*t:  R² = S_ty² / (S_tt * S_yy)  with S_ty = sum (t - t̄)(y - ȳ),  S_yy = sum (y - ȳ)².
A constant series (S_yy = 0) has no R²: callers filter it, it never becomes NaN in a statistic.

Medians over billions of parameters come from a fixed histogram of R² on [0, 1] with FINE_BINS
bins: the median is interpolated inside the bin that holds it, so it is off by less than one bin
width (1/FINE_BINS = 1e-5). Counts above thresholds are always exact.
"""

from __future__ import annotations

import base64
import math
import zlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from rlvrx.errors import UsageError

FINE_BINS = 100_000  # median resolution 1e-5
COARSE_BINS = 1_000  # layer x module heatmap cells: resolution 1e-3
THRESHOLDS = (0.7, 0.9)
MIN_CHECKPOINTS = 3


def check_steps(steps: Sequence[int], what: str = "checkpoints") -> list[int]:
    """Steps must be strictly increasing and at least MIN_CHECKPOINTS of them."""
    steps = [int(s) for s in steps]
    for a, b in zip(steps, steps[1:]):
        if a == b:
            raise UsageError(f"step {a} appears twice among the {what}; each step needs exactly one checkpoint")
        if b < a:
            raise UsageError(f"steps are not in increasing order ({steps}); list the {what} sorted by step")
    if len(steps) < MIN_CHECKPOINTS:
        raise UsageError(
            f"R² against step needs at least {MIN_CHECKPOINTS} {what}, got {len(steps)} (steps {steps}); "
            "with 2 points every line fits exactly and R² is undefined"
        )
    return steps


def centered_steps(steps: Sequence[int]) -> np.ndarray:
    t = np.array([float(s) for s in steps], dtype=np.float64)
    return t - t.mean()


def r2_columns(y: np.ndarray, steps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(R², S_yy) per column of y [K, n] (float64). R² is 0 where S_yy = 0: mask those with S_yy > 0."""
    tc = centered_steps(steps)
    y = np.array(y, dtype=np.float64)
    y -= y.mean(axis=0, keepdims=True)
    s_ty = tc @ y
    s_yy = np.einsum("kn,kn->n", y, y)
    s_tt = float(tc @ tc)
    r2 = s_ty * s_ty / (np.where(s_yy > 0, s_yy, 1.0) * s_tt)
    return np.clip(r2, 0.0, 1.0, out=r2), s_yy


def holdout_weights(steps: Sequence[int]) -> np.ndarray:
    """w [K-1] such that w @ y[:K-1] is the least-squares line through the first K-1 points at step K-1."""
    t = np.array([float(s) for s in steps], dtype=np.float64)
    head = t[:-1]
    u = head - head.mean()
    return 1.0 / len(head) + u * (t[-1] - head.mean()) / (u @ u)


def holdout_vector(steps: Sequence[int]) -> np.ndarray:
    """v [K] with v @ y = (line through the first K-1 points, at step K-1) - y[K-1]; sums to 0."""
    return np.append(holdout_weights(steps), -1.0)


# ----------------------------------------------------------------------------------------------
# Histograms


def bin_index(values: np.ndarray, bins: int) -> np.ndarray:
    idx = (values * bins).astype(np.int64)
    return np.clip(idx, 0, bins - 1, out=idx)


def histogram(values: np.ndarray, bins: int) -> np.ndarray:
    """int64 counts of values in [0, 1] over `bins` equal bins (1.0 falls in the last bin)."""
    return np.bincount(bin_index(np.asarray(values, dtype=np.float64), bins), minlength=bins).astype(np.int64)


def _value_at_rank(counts: np.ndarray, cumulative: np.ndarray, rank: int) -> float:
    b = int(np.searchsorted(cumulative, rank, side="right"))
    before = int(cumulative[b - 1]) if b else 0
    width = 1.0 / len(counts)
    return (b + (rank - before + 0.5) / int(counts[b])) * width


def histogram_median(counts: np.ndarray) -> float | None:
    """Median of the values binned in counts, interpolated within its bin (error < one bin width)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return None
    cumulative = np.cumsum(counts)
    if total % 2:
        return _value_at_rank(counts, cumulative, total // 2)
    return 0.5 * (_value_at_rank(counts, cumulative, total // 2 - 1) + _value_at_rank(counts, cumulative, total // 2))


def rebin(counts: np.ndarray, bins: int) -> np.ndarray:
    """Coarser histogram (bins must divide len(counts))."""
    counts = np.asarray(counts, dtype=np.int64)
    if len(counts) % bins:
        raise ValueError(f"{bins} bins do not divide {len(counts)}")
    return counts.reshape(bins, -1).sum(axis=1)


def encode_array(array: np.ndarray) -> dict:
    """A numpy array as JSON-safe text: dtype, length and base64 of zlib-compressed little-endian bytes."""
    array = np.ascontiguousarray(array)
    dtype = array.dtype.newbyteorder("<")
    raw = array.astype(dtype, copy=False).tobytes()
    return {"dtype": dtype.str, "n": int(array.size), "zlib_b64": base64.b64encode(zlib.compress(raw, 6)).decode()}


def decode_array(data: dict) -> np.ndarray:
    raw = zlib.decompress(base64.b64decode(data["zlib_b64"]))
    array = np.frombuffer(raw, dtype=np.dtype(data["dtype"])).copy()
    if array.size != data["n"]:
        raise ValueError(f"encoded array holds {array.size} values, expected {data['n']}")
    return array


# ----------------------------------------------------------------------------------------------
# Summaries


@dataclass
class Summary:
    """Location and threshold statistics of a set of R² values."""

    n: int
    mean: float | None
    median: float | None
    frac_gt_0_7: float | None
    frac_gt_0_9: float | None

    def to_json(self) -> dict:
        return {
            "n": self.n,
            "mean_r2": self.mean,
            "median_r2": self.median,
            "frac_r2_gt_0_7": self.frac_gt_0_7,
            "frac_r2_gt_0_9": self.frac_gt_0_9,
        }


def summarize_values(values: np.ndarray | Iterable[float]) -> Summary:
    """Exact statistics of explicit values (sampled parameters, token positions)."""
    values = np.asarray(values, dtype=np.float64)
    n = int(values.size)
    if n == 0:
        return Summary(0, None, None, None, None)
    return Summary(
        n=n,
        mean=math.fsum(values.tolist()) / n,
        median=float(np.median(values)),
        frac_gt_0_7=int((values > 0.7).sum()) / n,
        frac_gt_0_9=int((values > 0.9).sum()) / n,
    )
