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
order-independent; a tensor's blocks never depend on the shard or the threads), so analysing every
`shard=(i, n)` and merging the states (state.merge_states) reproduces a single run bit for bit.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from rlvrx.io.reader import Checkpoint
from rlvrx.errors import UsageError
from rlvrx.linearity import stats
from rlvrx.linearity.kernel import READ_DTYPES, Kernel, TensorJob, cast_on_read, run_part
from rlvrx.linearity.naming import layer_of, module_of
from rlvrx.linearity.plan import float_tensors, open_checked, selected_tensors, structure_fingerprint
from rlvrx.linearity.state import TensorStats, WeightState, add_hist


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
    read_dtype: str | None = None  # "bfloat16": every value cast on read (the official code); None: as stored
    tensors: tuple[str, ...] = ()  # glob patterns of the tensors to analyse (fnmatch); () = every float tensor

    def __post_init__(self):
        if not self.min_abs_change >= 0:
            raise UsageError(f"min_abs_change must be >= 0, got {self.min_abs_change}")
        if self.min_unique < 1:
            raise UsageError(f"min_unique must be >= 1, got {self.min_unique}")
        if self.sample is not None and not 0 < self.sample <= 1:
            raise UsageError(f"sample must be a fraction in (0, 1], got {self.sample}")
        if self.min_per_tensor < 1:
            raise UsageError(f"min_per_tensor must be >= 1, got {self.min_per_tensor}")
        if self.memory_mb < 1:
            raise UsageError(f"memory_mb must be >= 1, got {self.memory_mb}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"threads must be >= 1, got {self.threads}")
        if self.read_dtype is not None and self.read_dtype not in READ_DTYPES:
            raise UsageError(f"read_dtype must be one of {', '.join(READ_DTYPES)} or None, got {self.read_dtype!r}")
        if isinstance(self.tensors, str) or not all(isinstance(p, str) and p for p in self.tensors):
            raise UsageError(f"tensors must be a sequence of non-empty glob patterns, got {self.tensors!r}")
        object.__setattr__(self, "tensors", tuple(self.tensors))

    def fingerprint(self) -> dict:
        """The settings that change results (memory and threads do not)."""
        data = asdict(self)
        del data["memory_mb"], data["max_block_elements"], data["threads"]
        data["tensors"] = list(self.tensors)
        return data


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
    todo = selected_tensors(checkpoints, shard, settings.tensors)
    kernels: dict[str, Kernel] = {}
    jobs = []
    for name, _ in todo:
        info = infos[name]
        record = TensorStats(index=index[name], name=name, module=module_of(name), layer=layer_of(name), numel=info.numel)
        dtype, cast = cast_on_read(info.dtype_name, settings.read_dtype)
        kernel = kernels.get(dtype) or kernels.setdefault(dtype, Kernel(steps, dtype, settings))
        jobs.append(TensorJob(record, [c.raw(name).data for c in ckpts], kernel, settings, cast))
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

    for (job, part), result in _ordered_map(run_part, tasks(), settings.threads or _default_threads()):
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


def _add_tensor(hists: dict, cells: dict, job: "TensorJob") -> None:
    tensor_hist = job.finish()
    record = job.record
    layer = "-" if record.layer is None else str(record.layer)
    add_hist(hists, f"module:{record.module}", tensor_hist)
    add_hist(hists, f"layer:{layer}", tensor_hist)
    add_hist(cells, f"{layer}|{record.module}", stats.rebin(tensor_hist, stats.COARSE_BINS))


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
