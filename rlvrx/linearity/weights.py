"""Weight linearity: per-parameter R² of value against step, streamed over a whole trajectory.

Tensors are read as flat views of the memory-mapped safetensors files (no copy; the page cache
holds the data, so memory stays at a few blocks per thread whatever the model size).

Full coverage (default): every parameter, in blocks of 256K parameters spread over threads. A small
compiled kernel (rlvrx/_native.c, called through ctypes, which releases the GIL) reduces each block of K
checkpoints in one pass over L1-sized tiles (installed without it, block_numpy does, with the same results):

- R² per parameter (see stats.py) after the filters: constant parameters, max - min below
  `min_abs_change`, fewer than `min_unique` distinct values (each parameter is counted once, under
  the first filter it fails, in that order);
- exact counts (R² > 0.7, > 0.9), sums (mean) and fixed histograms (medians, error < 1e-5);
- diagnostics over every parameter: dot products and squared norms of successive deltas
  (direction cosine) and the error of the least-squares line through the first K-1 checkpoints at
  the last one (held-out relative error = |prediction - W_K| / |W_K - W_{K-1}|; < 1 means the line
  beats "no change").

Precision: every parameter's K values are widened to float64 and centred before any sum, so R²,
filters and threshold counts are float64's (distinct values: the stored values compared as
float64, so -0 equals +0).

With `sample`, only the seeded per-tensor sample is read (gathered from the mapped files) and the
same kernel computes every statistic, the diagnostics (direction cosine, held-out error) included,
on the sampled parameters, keeping each R² for exact medians: the paper's setting, and fast.

The result is a `WeightState`: per-tensor records plus integer histograms. States of disjoint
tensor shards merge exactly (integers add, float sums are combined with math.fsum, which is
order-independent; a tensor's blocks never depend on the shard or the threads), so `--shard I/N` +
merge reproduces a single run bit for bit.
"""

from __future__ import annotations

import binascii
import hashlib
import itertools
import math
import os
import re
import threading
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from rlvrx import native
from rlvrx.checkpoint import DTYPE_INFO, Checkpoint, TensorInfo, compare_structure
from rlvrx.errors import CheckpointError, RlvrxError, UsageError
from rlvrx.linearity import block_numpy, stats

STATE_FORMAT = "rlvrx.linearity.weights/1"
MODULES = ("embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "head", "other")
_MODULE_PATTERNS = (
    ("norm", re.compile(r"norm|(^|\.)ln_?\w*\.")),
    ("embed", re.compile(r"embed_tokens|(^|\.)wte\.|word_embeddings|embed_in\.|tok_embeddings")),
    ("head", re.compile(r"lm_head|embed_out\.|(^|\.)output\.weight$")),
    ("q", re.compile(r"q_proj|\.wq\.|\.query\.")),
    ("k", re.compile(r"k_proj|\.wk\.|\.key\.")),
    ("v", re.compile(r"v_proj|\.wv\.|\.value\.")),
    ("o", re.compile(r"o_proj|out_proj|\.wo\.|attn\.c_proj|attention\.dense|attention\.output\.dense")),
    ("gate", re.compile(r"gate_proj|\.w1\.")),
    ("up", re.compile(r"up_proj|\.w3\.|c_fc|fc1|dense_h_to_4h")),
    ("down", re.compile(r"down_proj|\.w2\.|mlp\.c_proj|fc2|dense_4h_to_h")),
)
_LAYER = re.compile(r"\.(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.")
FILTERS = ("constant", "min_abs_change", "min_unique")


def module_of(name: str) -> str:
    for module, pattern in _MODULE_PATTERNS:
        if pattern.search(name):
            return module
    return "other"


def layer_of(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class WeightSettings:
    min_abs_change: float = 1e-4
    min_unique: int = 4
    sample: float | None = None  # fraction of parameters per tensor; None = every parameter
    min_per_tensor: int = 50
    seed: int = 0
    memory_mb: int = 512  # cap on the working memory of one block of K checkpoints (per thread)
    max_block_elements: int | None = None  # cap on parameters per block (tests force several blocks)
    threads: int | None = None  # worker threads over blocks; None = the usable cores (at most 8)

    def __post_init__(self):
        if not self.min_abs_change >= 0:
            raise UsageError(f"--min-abs-change must be >= 0, got {self.min_abs_change}")
        if self.min_unique < 1:
            raise UsageError(f"--min-unique must be >= 1, got {self.min_unique}")
        if self.sample is not None and not 0 < self.sample <= 1:
            raise UsageError(f"--sample must be a fraction in (0, 1], got {self.sample}")
        if self.min_per_tensor < 1:
            raise UsageError(f"--min-per-tensor must be >= 1, got {self.min_per_tensor}")
        if self.memory_mb < 1:
            raise UsageError(f"--memory-mb must be >= 1, got {self.memory_mb}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")

    def fingerprint(self) -> dict:
        """The settings that change results (memory and threads do not)."""
        data = asdict(self)
        del data["memory_mb"], data["max_block_elements"], data["threads"]
        return data


@dataclass
class TensorStats:
    """Everything one tensor contributes; sums are float64, counts exact."""

    index: int
    name: str
    module: str
    layer: int | None
    numel: int
    n_examined: int = 0
    n: int = 0
    filtered: dict = field(default_factory=lambda: {f: 0 for f in FILTERS})
    sum_r2: float = 0.0
    n_gt_0_7: int = 0
    n_gt_0_9: int = 0
    median_r2: float | None = None
    delta_sq: list = field(default_factory=list)  # |W_{i+1} - W_i|², i = 0..K-2
    delta_dot: list = field(default_factory=list)  # <d_i, d_{i+1}>, i = 0..K-3
    holdout_err_sq: float = 0.0
    total_sq: float = 0.0  # |W_K - W_1|², the whole trajectory's change
    values: np.ndarray | None = None  # sampled mode: kept R² values in index order

    @property
    def n_filtered(self) -> int:
        return sum(self.filtered.values())

    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "values"}
        if self.values is not None:
            data["values"] = stats.encode_array(self.values)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "TensorStats":
        data = dict(data)
        values = data.pop("values", None)
        out = cls(**data)
        out.values = None if values is None else stats.decode_array(values)
        return out


# ----------------------------------------------------------------------------------------------
# Plan: tensors, shards, samples


def float_tensors(infos: dict[str, TensorInfo]) -> list[str]:
    return [name for name, info in infos.items() if info.is_float]


def structure_fingerprint(infos: dict[str, TensorInfo]) -> str:
    digest = hashlib.sha256()
    for name, info in infos.items():
        digest.update(f"{name}:{list(info.shape)}:torch.{DTYPE_INFO[info.dtype_name][1]};".encode())
    return digest.hexdigest()[:16]


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (0-based I) -> (I, N)."""
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise UsageError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    index, count = int(index), int(count)
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: the index is 0-based, so I must be in 0..{max(count - 1, 0)}")
    return index, count


def plan_shards(sizes: Sequence[tuple[str, int]], n_shards: int) -> list[list[str]]:
    """Deterministic disjoint partition of tensors balanced by size (largest first onto the lightest shard).

    Each shard lists its tensors in their original order.
    """
    order = {name: i for i, (name, _) in enumerate(sizes)}
    loads = [0] * n_shards
    shards: list[list[str]] = [[] for _ in range(n_shards)]
    for name, size in sorted(sizes, key=lambda item: (-item[1], order[item[0]])):
        target = min(range(n_shards), key=lambda s: (loads[s], s))
        shards[target].append(name)
        loads[target] += size
    return [sorted(names, key=order.__getitem__) for names in shards]


def sample_indices(name: str, numel: int, fraction: float, min_per_tensor: int, seed: int) -> np.ndarray:
    """Sorted flat indices of the parameters sampled from one tensor; depends only on (seed, name, sizes)."""
    size = min(numel, max(min_per_tensor, int(round(fraction * numel))))
    if size >= numel:
        return np.arange(numel, dtype=np.int64)
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & (2**63 - 1), name_key]))
    idx = rng.choice(numel, size=size, replace=False, shuffle=False).astype(np.int64)
    idx.sort()
    return idx


def block_elements(k: int, itemsize: int, memory_mb: int) -> int:
    """Parameters per kernel call, within memory_mb: per parameter at most the K gathered values of a
    sample and its float64 R² (full coverage reads the mapped files in place)."""
    per_column = k * itemsize + 16
    return max(1024, min(_BLOCK, memory_mb * (1 << 20) // per_column))


MAX_CHECKPOINTS = 4096  # the compiled kernel's limit (_native.c MAX_K)


def open_checked(checkpoints: Sequence[tuple[int, Checkpoint]]) -> tuple[list[int], list[Checkpoint]]:
    steps = stats.check_steps([s for s, _ in checkpoints])
    if len(steps) > MAX_CHECKPOINTS:
        raise UsageError(f"weight linearity takes at most {MAX_CHECKPOINTS} checkpoints, got {len(steps)}; use --window or every n-th step")
    ckpts = [c for _, c in checkpoints]
    for ckpt in ckpts[1:]:
        diff = compare_structure(ckpts[0], ckpt)
        if diff:
            raise CheckpointError(diff)
    return steps, ckpts


# ----------------------------------------------------------------------------------------------
# State


@dataclass
class WeightState:
    steps: list[int]
    settings: dict
    structure: dict  # fingerprint, n_tensors (float tensors in the model), numel
    n_shards: int
    shards: list[int]  # shard indices this state covers
    tensors: list[TensorStats]
    hists: dict[str, np.ndarray]  # "module:q", "layer:3", "layer:-" -> FINE_BINS counts
    cells: dict[str, np.ndarray]  # "3|q" -> COARSE_BINS counts
    skipped: list[str] = field(default_factory=list)  # non-float tensors

    @property
    def sampled(self) -> bool:
        return self.settings.get("sample") is not None

    def to_json(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "settings": self.settings,
            "structure": self.structure,
            "n_shards": self.n_shards,
            "shards": self.shards,
            "skipped": self.skipped,
            "tensors": [t.to_json() for t in self.tensors],
            "hists": {k: stats.encode_array(v) for k, v in self.hists.items()},
            "cells": {k: stats.encode_array(v) for k, v in self.cells.items()},
        }

    @classmethod
    def from_json(cls, data: dict, where: str = "part") -> "WeightState":
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise UsageError(f"{where}: not a weight-linearity part file (write one with `rlvrx linearity weights --shard I/N`)")
        try:
            return cls(
                steps=list(data["steps"]),
                settings=dict(data["settings"]),
                structure=dict(data["structure"]),
                n_shards=int(data["n_shards"]),
                shards=list(data["shards"]),
                skipped=list(data.get("skipped", [])),
                tensors=[TensorStats.from_json(t) for t in data["tensors"]],
                hists={k: stats.decode_array(v) for k, v in data["hists"].items()},
                cells={k: stats.decode_array(v) for k, v in data["cells"].items()},
            )
        except (KeyError, TypeError, ValueError, zlib.error, binascii.Error) as exc:
            raise UsageError(f"{where}: damaged part file ({type(exc).__name__}: {exc}); rerun its shard") from None


def _add_hist(store: dict[str, np.ndarray], key: str, counts: np.ndarray) -> None:
    if key in store:
        store[key] = store[key] + counts
    else:
        store[key] = counts.copy()


def merge_states(states: Sequence[WeightState], where: Sequence[str] | None = None) -> WeightState:
    """Combine states of disjoint shards; they must share steps, settings and model structure."""
    if not states:
        raise UsageError("nothing to merge: pass the part files written by `rlvrx linearity weights --shard I/N`")
    where = list(where or [f"part {i}" for i in range(len(states))])
    first = states[0]
    covered: dict[int, str] = {}
    names: dict[str, str] = {}
    for state, label in zip(states, where):
        for key in ("steps", "settings", "structure", "n_shards"):
            if getattr(state, key) != getattr(first, key):
                raise UsageError(f"{label}: {key} {getattr(state, key)} differ from {where[0]}'s {getattr(first, key)}; parts must come from one command")
        for shard in state.shards:
            if shard in covered:
                raise UsageError(f"{label}: shard {shard}/{first.n_shards} is also in {covered[shard]}")
            covered[shard] = label
        for t in state.tensors:
            if t.name in names:
                raise UsageError(f"{label}: tensor {t.name} is also in {names[t.name]}")
            names[t.name] = label
    missing = sorted(set(range(first.n_shards)) - set(covered))
    if missing:
        raise UsageError(f"the parts cover shards {sorted(covered)} of {first.n_shards}; missing {missing} (run `--shard {missing[0]}/{first.n_shards}`)")
    hists: dict[str, np.ndarray] = {}
    cells: dict[str, np.ndarray] = {}
    for state in states:
        for key, counts in state.hists.items():
            _add_hist(hists, key, counts)
        for key, counts in state.cells.items():
            _add_hist(cells, key, counts)
    return WeightState(
        steps=first.steps,
        settings=first.settings,
        structure=first.structure,
        n_shards=first.n_shards,
        shards=sorted(covered),
        tensors=sorted((t for s in states for t in s.tensors), key=lambda t: t.index),
        hists=dict(sorted(hists.items())),
        cells=dict(sorted(cells.items())),
        skipped=first.skipped,
    )


# ----------------------------------------------------------------------------------------------
# Analysis


def selected_tensors(checkpoints: Sequence[tuple[int, Checkpoint]], shard: tuple[int, int] | None = None) -> list[tuple[str, int]]:
    """(name, numel) of the floating-point tensors this run (or shard) analyses, in checkpoint order."""
    infos = checkpoints[0][1].infos()
    sizes = [(name, infos[name].numel) for name in float_tensors(infos)]
    if shard is None:
        return sizes
    chosen = set(plan_shards(sizes, shard[1])[shard[0]])
    return [(name, size) for name, size in sizes if name in chosen]


def analyze_weights(
    checkpoints: Sequence[tuple[int, Checkpoint]],
    settings: WeightSettings = WeightSettings(),
    shard: tuple[int, int] | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> WeightState:
    """Stream every selected tensor once through all K checkpoints; progress(name, n_params_done)."""
    steps, ckpts = open_checked(checkpoints)
    infos = ckpts[0].infos()
    names = float_tensors(infos)
    index = {name: i for i, name in enumerate(infos)}
    todo = selected_tensors(checkpoints, shard)
    kernels: dict[str, _Kernel] = {}
    jobs = []
    for name, _ in todo:
        info = infos[name]
        record = TensorStats(index=index[name], name=name, module=module_of(name), layer=layer_of(name), numel=info.numel)
        kernel = kernels.get(info.dtype_name) or kernels.setdefault(info.dtype_name, _Kernel(steps, info.dtype_name, settings))
        jobs.append(_TensorJob(record, [c.raw(name).data for c in ckpts], kernel, settings))
    hists: dict[str, np.ndarray] = {}
    cells: dict[str, np.ndarray] = {}

    def read_ahead(i: int) -> None:
        if settings.sample is None and i < len(jobs):  # a sample reads 0.1%: no whole-tensor readahead
            for ckpt in ckpts:
                ckpt.will_need(jobs[i].record.name)

    def tasks():
        read_ahead(0)
        for i, job in enumerate(jobs):
            read_ahead(i + 1)  # the next tensor is read while this one is computed
            job.plan()  # lazily: a sample's indices exist only while its tensor is in flight
            if job.pending == 0:  # an empty tensor
                _add_tensor(hists, cells, job)
            for part in job.parts:
                yield job, part
            job.parts = None

    for (job, part), result in _ordered_map(_run_part, tasks(), settings.threads or _default_threads()):
        job.add(result)
        if progress is not None:
            progress(job.record.name, part.n_params)
        if job.pending == 0:
            _add_tensor(hists, cells, job)
    records = [job.record for job in jobs]
    return WeightState(
        steps=steps,
        settings=settings.fingerprint(),
        structure={"fingerprint": structure_fingerprint(infos), "n_tensors": len(names), "numel": sum(infos[n].numel for n in names)},
        n_shards=1 if shard is None else shard[1],
        shards=[0] if shard is None else [shard[0]],
        tensors=records,
        hists=dict(sorted(hists.items())),
        cells=dict(sorted(cells.items())),
        skipped=[name for name in infos if name not in set(names)],
    )


def _add_tensor(hists: dict, cells: dict, job: "_TensorJob") -> None:
    tensor_hist = job.finish()
    record = job.record
    layer = "-" if record.layer is None else str(record.layer)
    _add_hist(hists, f"module:{record.module}", tensor_hist)
    _add_hist(hists, f"layer:{layer}", tensor_hist)
    _add_hist(cells, f"{layer}|{record.module}", stats.rebin(tensor_hist, stats.COARSE_BINS))


def _default_threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _ordered_map(fn, items, threads: int) -> Iterator:
    """(item, fn(item)) on `threads` threads, in item order, a few items in flight at a time."""
    if threads <= 1:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(threads) as pool:
        window: deque = deque()
        for item in items:
            window.append((item, pool.submit(fn, item)))
            if len(window) >= 3 * threads:
                item, future = window.popleft()
                yield item, future.result()
        while window:
            item, future = window.popleft()
            yield item, future.result()


_BLOCK = 1 << 18  # parameters per kernel call (the kernel itself works in L1-sized tiles)


def _lookup_table(dtype_name: str) -> np.ndarray | None:
    """float64 value of every bit pattern of a 1- or 2-byte float type other than bf16."""
    if dtype_name == "F16":
        return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    if dtype_name.startswith("F8"):
        import torch

        fp8 = getattr(torch, DTYPE_INFO[dtype_name][1])
        return torch.arange(256, dtype=torch.uint8).view(fp8).double().numpy()
    return None


class _Kernel:
    """Everything a block needs that depends only on the steps, the dtype and the settings."""

    def __init__(self, steps: Sequence[int], dtype_name: str, settings: WeightSettings):
        self.k = len(steps)
        self.steps = list(steps)
        self.settings = settings
        self.kind = native.RAW_KINDS[dtype_name]
        self.lut = _lookup_table(dtype_name)
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
                rows, self.kind, self.lut, k, self.tc, self.s_tt, self.holdout, float(self.settings.min_abs_change),
                self.settings.min_unique, self.thresholds, stats.FINE_BINS, hist, values)
            return self._summary(n, counts, sums, kept)
        counts = np.zeros(7, dtype=np.int64)
        sums = np.zeros(2 * k)
        kept = np.empty(n) if values else None
        pointers = np.array([r.ctypes.data for r in rows], dtype=np.uintp)  # alive until the call returns
        status = self.entry(
            pointers.ctypes.data, self.kind, None if self.lut is None else self.lut.ctypes.data, n, self.k,
            self.tc.ctypes.data, self.s_tt, self.holdout.ctypes.data, float(self.settings.min_abs_change),
            self.settings.min_unique, self.thresholds.ctypes.data, stats.FINE_BINS, counts.ctypes.data, sums.ctypes.data,
            None if hist is None else hist.ctypes.data, None if kept is None else kept.ctypes.data,
        )
        if status:
            raise RlvrxError(f"weight-linearity kernel failed (status {status}) on a block of {n} parameters")
        return self._summary(n, counts, sums, kept)

    def _summary(self, n: int, counts: np.ndarray, sums: np.ndarray, kept: np.ndarray | None) -> dict:
        k = self.k
        out = {
            "n_examined": n, "non_finite": int(counts[6]), "constant": int(counts[0]), "min_abs_change": int(counts[1]), "min_unique": int(counts[2]),
            "n": int(counts[3]), "above": (int(counts[4]), int(counts[5])), "sum_r2": float(sums[0]),
            "err_sq": float(sums[1]), "total_sq": float(sums[2]), "delta_sq": sums[3:k + 2], "delta_dot": sums[k + 2:2 * k],
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


def _run_part(task) -> dict:
    job, part = task
    if part.indices is None:
        rows = [v[part.lo:part.hi] for v in job.views]
        result = job.kernel.run(rows, job.thread_hist(), values=False)
    else:
        rows = [v[part.indices] for v in job.views]  # gathers the sample: K small contiguous arrays
        result = job.kernel.run(rows, None, values=True)
    if result["non_finite"]:
        kernel = job.kernel
        n = result["non_finite"]
        steps = [str(s) for s, row in zip(kernel.steps, rows) if not np.isfinite(kernel.as_float(row)).all()]
        what = f"NaN or infinite at step{'s' * (len(steps) > 1)} {', '.join(steps)}" if steps else "too large to sum in float64"
        raise CheckpointError(f"{job.record.name}: {n} parameter{'s are' if n > 1 else ' is'} {what}; weight linearity needs finite weights")
    return result


class _TensorJob:
    """One tensor: its parts (blocks, or chunks of the sample) and the accumulation of their results."""

    def __init__(self, record: TensorStats, views: list[np.ndarray], kernel: _Kernel, settings: WeightSettings):
        self.record, self.views, self.kernel, self.settings = record, views, kernel, settings
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
                chunk = sample[start:start + per_block]
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


# ----------------------------------------------------------------------------------------------
# Summaries


def _direction(records: Sequence[TensorStats]) -> tuple[float | None, list[float | None]]:
    """Mean over successive delta pairs of cos(d_i, d_{i+1}) pooled over the records, and the per-pair values."""
    if not records or not records[0].delta_dot:
        return None, []
    pairs = []
    for i in range(len(records[0].delta_dot)):
        dot = math.fsum(r.delta_dot[i] for r in records)
        a = math.fsum(r.delta_sq[i] for r in records)
        b = math.fsum(r.delta_sq[i + 1] for r in records)
        pairs.append(dot / math.sqrt(a * b) if a > 0 and b > 0 else None)
    defined = [p for p in pairs if p is not None]
    return (math.fsum(defined) / len(defined) if defined else None), pairs


def _holdout(records: Sequence[TensorStats], versus: str = "last") -> float | None:
    """|prediction - W_K| relative to the last step's change (versus="last") or to |W_K - W_1| ("total")."""
    err = math.fsum(r.holdout_err_sq for r in records)
    if versus == "total":
        scale = math.fsum(r.total_sq for r in records)
    else:
        scale = math.fsum(r.delta_sq[-1] for r in records) if records and records[0].delta_sq else 0.0
    return math.sqrt(err / scale) if scale > 0 else None


def _group(records: Sequence[TensorStats], counts: np.ndarray | None, sampled: bool) -> dict:
    n = sum(r.n for r in records)
    if sampled:
        values = [r.values for r in records if r.values is not None and r.values.size]
        median = float(np.median(np.concatenate(values))) if values else None
    else:
        median = stats.histogram_median(counts) if counts is not None else None
    direction, _ = _direction(records)
    return {
        "n": n,
        "n_filtered": sum(r.n_filtered for r in records),
        "mean_r2": math.fsum(r.sum_r2 for r in records) / n if n else None,
        "median_r2": median if n else None,
        "frac_r2_gt_0_7": sum(r.n_gt_0_7 for r in records) / n if n else None,
        "frac_r2_gt_0_9": sum(r.n_gt_0_9 for r in records) / n if n else None,
        "direction_cosine": direction,
        "holdout_rel_error": _holdout(records),
        "holdout_rel_error_total": _holdout(records, "total"),
    }


def _layer_key(layer: int | None) -> str:
    return "-" if layer is None else str(layer)


def summarize(state: WeightState) -> dict:
    """The full result: the public keys first, then breakdowns by filter, module, layer and cell."""
    records = sorted(state.tensors, key=lambda t: t.index)
    sampled = state.sampled
    module_hists = [v for k, v in state.hists.items() if k.startswith("module:")]
    global_hist = np.sum(module_hists, axis=0) if module_hists else np.zeros(stats.FINE_BINS, dtype=np.int64)
    overall = _group(records, global_hist, sampled)
    direction, pairs = _direction(records)
    tensors = []
    for r in records:
        one = _group([r], None, sampled)
        tensors.append({
            "name": r.name,
            "n": r.n,
            "mean_r2": one["mean_r2"],
            "median_r2": r.median_r2,
            "n_filtered": r.n_filtered,
            "frac_r2_gt_0_7": one["frac_r2_gt_0_7"],
            "direction_cosine": one["direction_cosine"],
            "holdout_rel_error": one["holdout_rel_error"],
        })
    modules = [m for m in MODULES if any(r.module == m for r in records)]
    layers = sorted({r.layer for r in records}, key=lambda l: (l is None, l if l is not None else 0))
    by_module = [{"module": m, **_group([r for r in records if r.module == m], state.hists.get(f"module:{m}"), sampled)} for m in modules]
    by_layer = [
        {"layer": l, **_group([r for r in records if r.layer == l], state.hists.get(f"layer:{_layer_key(l)}"), sampled)} for l in layers
    ]
    cells = []
    for l in layers:
        for m in modules:
            members = [r for r in records if r.layer == l and r.module == m]
            if members:
                group = _group(members, state.cells.get(f"{_layer_key(l)}|{m}"), sampled)
                cells.append({"layer": l, "module": m, "n": group["n"], "median_r2": group["median_r2"], "mean_r2": group["mean_r2"], "frac_r2_gt_0_7": group["frac_r2_gt_0_7"]})
    return {
        "median_r2": overall["median_r2"],
        "mean_r2": overall["mean_r2"],
        "frac_r2_gt_0_7": overall["frac_r2_gt_0_7"],
        "frac_r2_gt_0_9": overall["frac_r2_gt_0_9"],
        "n_params": overall["n"],
        "n_filtered": overall["n_filtered"],
        "steps": state.steps,
        "tensors": tensors,
        "direction_cosine": direction,
        "holdout_rel_error": overall["holdout_rel_error"],
        # details
        "holdout_rel_error_total": overall["holdout_rel_error_total"],
        "n_examined": sum(r.n_examined for r in records),
        "filters": {f: sum(r.filtered[f] for r in records) for f in FILTERS},
        "settings": state.settings,
        "median_resolution": None if sampled else 1.0 / stats.FINE_BINS,
        "cell_median_resolution": None if sampled else 1.0 / stats.COARSE_BINS,
        "direction_cosine_pairs": [
            {"steps": state.steps[i:i + 3], "cosine": c} for i, c in enumerate(pairs)
        ],
        "by_module": by_module,
        "by_layer": by_layer,
        "cells": cells,
        "histogram": stats.rebin(global_hist, 100).tolist(),
        "skipped_tensors": state.skipped,
        "shards": {"covered": state.shards, "of": state.n_shards},
    }


PUBLIC_KEYS = (
    "median_r2", "mean_r2", "frac_r2_gt_0_7", "frac_r2_gt_0_9", "n_params", "n_filtered", "steps", "tensors",
    "direction_cosine", "holdout_rel_error",
)


def public_json(summary: dict) -> dict:
    """The `--json` document: exactly the documented top-level keys."""
    return {key: summary[key] for key in PUBLIC_KEYS}


# ----------------------------------------------------------------------------------------------
# Outputs


def _row(label: str, group: dict) -> list:
    from rlvrx.report import fmt, pct

    return [
        label,
        group["n"],
        group["n_filtered"],
        fmt(group["mean_r2"]),
        fmt(group["median_r2"]),
        pct(group["frac_r2_gt_0_7"]),
        fmt(group["direction_cosine"]),
        fmt(group["holdout_rel_error"]),
    ]


COLUMNS = ("params", "filtered", "mean", "median", "> 0.7", "cos Δ", "holdout")


def tables(summary: dict) -> list:
    """Rich tables: by module type (with the global line) and by layer."""
    from rlvrx.report import table

    overall = {
        "n": summary["n_params"],
        "n_filtered": summary["n_filtered"],
        "mean_r2": summary["mean_r2"],
        "median_r2": summary["median_r2"],
        "frac_r2_gt_0_7": summary["frac_r2_gt_0_7"],
        "direction_cosine": summary["direction_cosine"],
        "holdout_rel_error": summary["holdout_rel_error"],
    }
    steps = summary["steps"]
    modules = [_row(g["module"], g) for g in summary["by_module"]] + [_row("all", overall)]
    layers = [_row("-" if g["layer"] is None else str(g["layer"]), g) for g in summary["by_layer"]]
    return [
        table(f"weight R² by module type ({len(steps)} checkpoints, steps {steps[0]}..{steps[-1]})", ("module", *COLUMNS), modules),
        table("weight R² by layer (- = outside the layers)", ("layer", *COLUMNS), layers),
    ]


def global_line(summary: dict) -> str:
    from rlvrx.report import fmt, pct

    f = summary["filters"]
    s = summary["settings"]
    mode = "every parameter" if s.get("sample") is None else f"sample {s['sample']} per tensor (min {s['min_per_tensor']}, seed {s['seed']})"
    return (
        f"median R² {fmt(summary['median_r2'])}, mean {fmt(summary['mean_r2'])}, "
        f"R² > 0.7: {pct(summary['frac_r2_gt_0_7'])}, R² > 0.9: {pct(summary['frac_r2_gt_0_9'])} "
        f"over {fmt(summary['n_params'])} parameters ({mode}); filtered {fmt(summary['n_filtered'])}: "
        f"constant {fmt(f['constant'])}, max-min < {s['min_abs_change']:g} {fmt(f['min_abs_change'])}, "
        f"< {s['min_unique']} distinct values {fmt(f['min_unique'])}; "
        f"direction cosine {fmt(summary['direction_cosine'])}; the line through the earlier steps misses step "
        f"{summary['steps'][-1]} by {fmt(summary['holdout_rel_error'])}x the last step's change "
        f"({pct(summary['holdout_rel_error_total'])} of the whole change)"
    )


def heatmap_matrix(summary: dict) -> tuple[np.ndarray, list[str], list[str]]:
    """Median R² per (layer, module) cell; rows = layers (then '-' for tensors outside layers)."""
    modules = [g["module"] for g in summary["by_module"]]
    layers = [g["layer"] for g in summary["by_layer"]]
    matrix = np.full((len(layers), len(modules)), np.nan)
    for cell in summary["cells"]:
        if cell["median_r2"] is not None:
            matrix[layers.index(cell["layer"]), modules.index(cell["module"])] = cell["median_r2"]
    return matrix, ["-" if l is None else str(l) for l in layers], modules


CSV_HEADER = (
    "name", "module", "layer", "n", "n_filtered", "mean_r2", "median_r2", "frac_r2_gt_0_7", "direction_cosine", "holdout_rel_error",
)


def write_outputs(summary: dict, out_dir, plots: bool = True) -> list:
    """summary.json, tensors.csv and (with plots) r2_hist.png, r2_heatmap.png under out_dir."""
    import json
    from pathlib import Path

    from rlvrx.checkpoint import atomic_write_text
    from rlvrx.report import save_heatmap_png, save_histogram_png, write_csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    path = out_dir / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=1) + "\n")
    written.append(path)
    rows = [
        [t["name"], module_of(t["name"]), layer_of(t["name"]), t["n"], t["n_filtered"], t["mean_r2"], t["median_r2"],
         t["frac_r2_gt_0_7"], t["direction_cosine"], t["holdout_rel_error"]]
        for t in summary["tensors"]
    ]
    written.append(write_csv(out_dir / "tensors.csv", CSV_HEADER, rows))
    if plots:
        steps = summary["steps"]
        written.append(save_histogram_png(
            out_dir / "r2_hist.png", summary["histogram"], title=f"weight R² vs step ({len(steps)} checkpoints, {summary['n_params']:,} params)",
            median=summary["median_r2"],
        ))
        matrix, row_labels, col_labels = heatmap_matrix(summary)
        if matrix.size:
            written.append(save_heatmap_png(
                out_dir / "r2_heatmap.png", matrix, row_labels, col_labels, title="median weight R² by layer and module",
                colorbar_label="median R²", xlabel="module", ylabel="layer",
            ))
    return written
