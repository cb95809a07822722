"""The per-block reduction: the compiled kernel through ctypes (it releases the GIL), else block_numpy.

`Kernel` holds what a block needs that depends only on the steps, the dtype and the settings;
`TensorJob` splits one tensor into parts (blocks, or chunks of its sample) and accumulates them.
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from rlvrx import kernels as native
from rlvrx.io.dtypes import DTYPE_INFO
from rlvrx.errors import CheckpointError, RlvrxError
from rlvrx.kernels import block_numpy
from rlvrx.linearity import stats
from rlvrx.linearity.plan import block_elements, sample_indices
from rlvrx.linearity.state import FILTERS, TensorStats

if TYPE_CHECKING:
    from rlvrx.linearity.weights import WeightSettings


def lookup_table(dtype_name: str) -> np.ndarray | None:
    """float64 value of every bit pattern of a 1- or 2-byte float type other than bf16."""
    if dtype_name == "F16":
        return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    if dtype_name.startswith("F8"):
        import torch

        fp8 = getattr(torch, DTYPE_INFO[dtype_name][1])
        return torch.arange(256, dtype=torch.uint8).view(fp8).double().numpy()
    return None


READ_DTYPES = ("bfloat16",)  # WeightSettings.read_dtype: cast every value on read (None: the stored dtype)


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (to nearest, ties to even, NaN kept NaN: torch's .to(bfloat16)),
    as the uint16 bit patterns the kernel reads."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def cast_on_read(dtype_name: str, read_dtype: str | None):
    """(kernel dtype, raw row -> raw row of that dtype or None): how a tensor stored as dtype_name is read."""
    if read_dtype is None or dtype_name == "BF16":
        return dtype_name, None
    if read_dtype != "bfloat16":
        raise RlvrxError(f"read_dtype must be one of {', '.join(READ_DTYPES)} or None, got {read_dtype!r}")
    lut = lookup_table(dtype_name)
    if lut is not None:
        return "BF16", lambda row: bf16_bits(lut[row].astype(np.float32))
    return "BF16", lambda row: bf16_bits(row.astype(np.float32))  # F64 goes through float32, as torch does


class Kernel:
    """Everything a block needs that depends only on the steps, the dtype and the settings."""

    def __init__(self, steps: Sequence[int], dtype_name: str, settings: WeightSettings):
        self.k = len(steps)
        self.steps = list(steps)
        self.settings = settings
        self.kind = native.RAW_KINDS[dtype_name]
        self.lut = lookup_table(dtype_name)
        self.tc = stats.centered_steps(steps)
        self.s_tt = float(self.tc @ self.tc)
        self.holdout = stats.holdout_vector(steps)
        self.thresholds = np.array(stats.THRESHOLDS, dtype=np.float64)
        self.entry = native.library().rlvrx_weight_block if native.available() else None

    def as_float(self, row: np.ndarray) -> np.ndarray:
        """Raw stored values as floats (for error messages)."""
        if self.lut is not None:
            return self.lut[row]
        if row.dtype == np.uint16:  # bf16: the high half of a float32
            return (row.astype(np.uint32) << 16).view(np.float32)
        return row

    def run(self, rows: list[np.ndarray], hist: np.ndarray | None, values: bool) -> dict:
        """Statistics of the parameters in rows (K arrays of n raw values); hist accumulates the kept R²."""
        n = len(rows[0])
        k = self.k
        if self.entry is None:
            counts, sums, kept = block_numpy.weight_block(
                rows,
                self.kind,
                self.lut,
                k,
                self.tc,
                self.s_tt,
                self.holdout,
                float(self.settings.min_abs_change),
                self.settings.min_unique,
                self.thresholds,
                stats.FINE_BINS,
                hist,
                values,
            )
            return self._summary(n, counts, sums, kept)
        counts = np.zeros(7, dtype=np.int64)
        sums = np.zeros(2 * k)
        kept = np.empty(n) if values else None
        pointers = np.array([r.ctypes.data for r in rows], dtype=np.uintp)  # alive until the call returns
        status = self.entry(
            pointers.ctypes.data,
            self.kind,
            None if self.lut is None else self.lut.ctypes.data,
            n,
            self.k,
            self.tc.ctypes.data,
            self.s_tt,
            self.holdout.ctypes.data,
            float(self.settings.min_abs_change),
            self.settings.min_unique,
            self.thresholds.ctypes.data,
            stats.FINE_BINS,
            counts.ctypes.data,
            sums.ctypes.data,
            None if hist is None else hist.ctypes.data,
            None if kept is None else kept.ctypes.data,
        )
        if status:
            raise RlvrxError(f"weight-linearity kernel failed (status {status}) on a block of {n} parameters")
        return self._summary(n, counts, sums, kept)

    def _summary(self, n: int, counts: np.ndarray, sums: np.ndarray, kept: np.ndarray | None) -> dict:
        k = self.k
        out = {
            "n_examined": n,
            "non_finite": int(counts[6]),
            "constant": int(counts[0]),
            "min_abs_change": int(counts[1]),
            "min_unique": int(counts[2]),
            "n": int(counts[3]),
            "above": (int(counts[4]), int(counts[5])),
            "sum_r2": float(sums[0]),
            "err_sq": float(sums[1]),
            "total_sq": float(sums[2]),
            "delta_sq": sums[3 : k + 2],
            "delta_dot": sums[k + 2 : 2 * k],
        }
        if kept is not None:
            out["values"] = kept[: out["n"]]
        return out


@dataclass
class _Part:
    n_params: int  # for progress: parameters of the tensor this part accounts for
    lo: int = 0
    hi: int = 0
    indices: np.ndarray | None = None  # sampled mode: flat indices of the sampled parameters


_thread_slot = threading.local()
_slots = itertools.count()


def run_part(task) -> dict:
    job, part = task
    if part.indices is None:
        rows = [v[part.lo : part.hi] for v in job.views]
        if job.cast is not None:
            rows = [job.cast(r) for r in rows]
        result = job.kernel.run(rows, job.thread_hist(), values=False)
    else:
        rows = [v[part.indices] for v in job.views]  # gathers the sample: K small contiguous arrays
        if job.cast is not None:
            rows = [job.cast(r) for r in rows]
        result = job.kernel.run(rows, None, values=True)
    if result["non_finite"]:
        kernel = job.kernel
        n = result["non_finite"]
        steps = [str(s) for s, row in zip(kernel.steps, rows) if not np.isfinite(kernel.as_float(row)).all()]
        what = f"NaN or infinite at step{'s' * (len(steps) > 1)} {', '.join(steps)}" if steps else "too large to sum in float64"
        raise CheckpointError(f"{job.record.name}: {n} parameter{'s are' if n > 1 else ' is'} {what}; weight linearity needs finite weights")
    return result


class TensorJob:
    """One tensor: its parts (blocks, or chunks of the sample) and the accumulation of their results."""

    def __init__(self, record: TensorStats, views: list[np.ndarray], kernel: Kernel, settings: WeightSettings, cast=None):
        self.record, self.views, self.kernel, self.settings, self.cast = record, views, kernel, settings, cast
        self.sampled = settings.sample is not None
        per_block = block_elements(kernel.k, views[0].itemsize, settings.memory_mb)
        if settings.max_block_elements is not None:
            per_block = max(1, min(per_block, settings.max_block_elements))
        self.per_block = per_block
        self.parts: list[_Part] | None = None
        self.pending = -1
        self.hists: dict[int, np.ndarray] = {}  # per worker thread: blocks of one tensor run in parallel
        self.sums: dict[str, list] = {key: [] for key in ("sum_r2", "err_sq", "total_sq", "delta_sq", "delta_dot")}
        self.above = [0, 0]
        self.values: list[np.ndarray] = []

    def thread_hist(self) -> np.ndarray:
        slot = getattr(_thread_slot, "slot", None)
        if slot is None:
            slot = _thread_slot.slot = next(_slots)
        hist = self.hists.get(slot)
        if hist is None:
            hist = self.hists[slot] = np.zeros(stats.FINE_BINS, dtype=np.int64)
        return hist

    def plan(self) -> None:
        record, settings, per_block = self.record, self.settings, self.per_block
        numel = record.numel
        if self.sampled:
            sample = sample_indices(record.name, numel, settings.sample, settings.min_per_tensor, settings.seed)
            self.parts = []
            done = 0
            for start in range(0, len(sample), per_block):
                chunk = sample[start : start + per_block]
                end = numel if start + per_block >= len(sample) else int(chunk[-1]) + 1
                self.parts.append(_Part(n_params=end - done, indices=chunk))
                done = end
        else:
            self.parts = [_Part(n_params=min(numel, lo + per_block) - lo, lo=lo, hi=min(numel, lo + per_block)) for lo in range(0, numel, per_block)]
        self.pending = len(self.parts)

    def add(self, result: dict) -> None:
        record = self.record
        record.n_examined += result["n_examined"]
        for key in FILTERS:
            record.filtered[key] += result[key]
        record.n += result["n"]
        self.above[0] += result["above"][0]
        self.above[1] += result["above"][1]
        for key, parts in self.sums.items():
            parts.append(result[key])
        if "values" in result and result["values"].size:
            self.values.append(result["values"])
        self.pending -= 1

    def finish(self) -> np.ndarray:
        """Fill the record; returns the tensor's FINE_BINS histogram of kept R²."""
        record, sums = self.record, self.sums
        if self.sampled:
            values = np.concatenate(self.values) if self.values else np.zeros(0)
            hist = stats.histogram(values, stats.FINE_BINS)
            record.values = values
            record.median_r2 = float(np.median(values)) if values.size else None
        else:
            hist = sum(self.hists.values()) if self.hists else np.zeros(stats.FINE_BINS, dtype=np.int64)
            record.median_r2 = stats.histogram_median(hist)
        record.n_gt_0_7, record.n_gt_0_9 = self.above
        record.sum_r2 = math.fsum(sums["sum_r2"])
        record.holdout_err_sq = math.fsum(sums["err_sq"])
        record.total_sq = math.fsum(sums["total_sq"])
        record.delta_sq = [math.fsum(col) for col in zip(*sums["delta_sq"])] or [0.0] * (self.kernel.k - 1)
        record.delta_dot = [math.fsum(col) for col in zip(*sums["delta_dot"])] or [0.0] * (self.kernel.k - 2)
        self.views = self.sums = self.values = self.hists = None
        return hist
