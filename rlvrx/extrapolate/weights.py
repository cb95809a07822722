"""Weight extrapolation: predict the checkpoint at step T from earlier ones, one tensor at a time.

Two-point: W_T = W_base + alpha (W_second - W_base), alpha = (T - S0) / (S1 - S0).
Least squares: each parameter's OLS line through the K checkpoints of a window, evaluated at T. The
fitted value at T is a fixed linear combination of the K values, sum_k c_k W_k with
c_k = 1/K + (T - t_mean)(t_k - t_mean) / S_tt, so it streams like the two-point case; it is
computed as W_ref + sum_k c_k (W_k - W_ref) (ref = latest checkpoint, sum c_k = 1), which keeps
float32 accurate when checkpoints are close together.

Inputs are read through memory maps (no copies). The two-point case is torch.lerp's arithmetic:
float32 inside for 16-bit types, one fused multiply-add per value; the result equals the float64
formula rounded to the output dtype for dyadic alphas such as -0.5, 2, 3, and is within one ulp of
it otherwise; --precise computes in float64. For bf16 and fp32 (in = out) a compiled kernel
(rlvrx/_native.c) does it, bit for bit torch.lerp's result, without importing torch (whose import
alone takes longer than extrapolating a 0.5B model); fp16, --dtype, --precise, least squares and
installs without the kernel go through torch. Norm weights and non-floating tensors are copied from the latest checkpoint.

Each tensor is computed in chunks into a small ring of reused buffers that a writer thread pwrites
into the atomic sharded writer while the next chunk is computed: peak memory is the ring (a few
chunks), and nothing appears at OUT unless the whole checkpoint is complete.

Provenance (extrapolation.json) records each input's path, size, mtime and a fingerprint of its
safetensors headers by default; the full sha256 of the inputs (another read of every byte) only
with hash_inputs (--hash) or when the trajectory manifest already knows it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import json
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import numpy as np

from rlvrx import __version__, native
from rlvrx.atomic import check_replaceable, recover
from rlvrx.checkpoint import (
    DTYPE_INFO,
    FLOAT_DTYPES,
    INDEX_NAME,
    Checkpoint,
    RawValues,
    ShardedWriter,
    atomic_dir,
    checkpoint_sha256,
    compare_structure,
    copy_aux_files,
    dtype_name,
    element_size,
    is_checkpoint_dir,
    weight_files,
)
from rlvrx.errors import CheckpointError, RlvrxError, UsageError

if TYPE_CHECKING:
    import torch

DEFAULT_COPY_PATTERNS = ("norm", "layernorm", "rmsnorm", "ln_")
PROVENANCE = "extrapolation.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
METHODS = ("two-point", "lstsq")

Progress = Callable[[str, int, int], None]  # (tensor just written, output bytes done, output bytes in all)
Warn = Callable[[str], None]


@dataclass
class Source:
    """One input checkpoint; `sha256` may come from the trajectory manifest to avoid re-hashing."""

    path: Path
    step: int | None = None
    sha256: str | None = None

    def __post_init__(self):
        self.path = Path(self.path)


@dataclass
class WeightsOptions:
    copy_patterns: Sequence[str] = DEFAULT_COPY_PATTERNS
    extrapolate_all: bool = False
    precise: bool = False
    dtype: torch.dtype | None = None
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    overwrite: bool = False
    hash_inputs: bool = False  # full sha256 of inputs the trajectory has no hash for (re-reads them); else a fingerprint
    hash_registered: bool = True  # --register: sha256 of the output into trajectory.json
    chunk_elements: int = 1 << 22
    threads: int | None = None  # torch threads for the arithmetic; None = cores left after writer/hash threads


@dataclass
class WeightsExtrapolation:
    """What was written, for the provenance file, the --json summary and the table."""

    out: Path
    method: str
    target_step: int | None
    alpha: float | None
    coefficients: list[float]
    inputs: list[dict]
    compute_dtype: str
    output_dtypes: list[str]
    extrapolated: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    registered: bool = False

    def provenance(self) -> dict:
        return {
            "rlvrx_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "method": self.method,
            "formula": (
                "W = W_base + alpha * (W_second - W_base)"
                if self.method == "two-point"
                else "W = sum_k c_k W_k (per-parameter least-squares line through the inputs, evaluated at target_step)"
            ),
            "target_step": self.target_step,
            "alpha": self.alpha,
            "coefficients": self.coefficients,
            "inputs": self.inputs,
            "inputs_identity": (
                "fingerprint = sha256 over each weight file's name, size, safetensors header and 16 evenly spaced 4 KiB blocks of its data; "
                "sha256 = checkpoint_sha256 of every byte (computed with --hash, or taken from the trajectory manifest), "
                "null when neither"
            ),
            "compute_dtype": self.compute_dtype,
            "output_dtypes": self.output_dtypes,
            "extrapolated_tensors": len(self.extrapolated),
            "copied_from": self.inputs[-1]["path"] if self.inputs else None,
            "copied": self.copied,
        }

    def summary(self) -> dict:
        return {
            "out": str(self.out),
            "method": self.method,
            "target_step": self.target_step,
            "alpha": self.alpha,
            "coefficients": self.coefficients,
            "inputs": self.inputs,
            "compute_dtype": self.compute_dtype,
            "output_dtypes": self.output_dtypes,
            "extrapolated_tensors": len(self.extrapolated),
            "copied_tensors": len(self.copied),
            "copied": self.copied,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
            "registered": self.registered,
        }


# ----------------------------------------------------------------------------------------------
# Coefficients


def two_point_alpha(base_step: int, second_step: int, target_step: float) -> float:
    """alpha = (T - S0) / (S1 - S0)."""
    if second_step == base_step:
        raise UsageError(f"--base and --second are both step {base_step}; extrapolation needs two different steps")
    if second_step < base_step:
        raise UsageError(
            f"--second ({second_step}) is before --base ({base_step}); the second checkpoint must be the later one (swap them)"
        )
    return (target_step - base_step) / (second_step - base_step)


def lstsq_coefficients(steps: Sequence[float], target_step: float) -> list[float]:
    """c_k such that sum_k c_k y_k is the OLS line through (steps[k], y_k) evaluated at target_step."""
    if len(steps) < 2:
        raise UsageError(f"a least-squares fit needs at least 2 checkpoints, got {len(steps)}")
    if len(set(steps)) != len(steps):
        raise UsageError(f"a least-squares fit needs distinct steps, got {list(steps)}")
    k = len(steps)
    mean = math.fsum(steps) / k
    s_tt = math.fsum((t - mean) ** 2 for t in steps)
    return [1.0 / k + (target_step - mean) * (t - mean) / s_tt for t in steps]


def interpolation_warning(method: str, steps: Sequence[int | None], target_step: float | None, alpha: float | None) -> str | None:
    """A sentence when the request does not extrapolate forward (allowed, but probably not meant)."""
    if method == "two-point":
        if alpha is None:
            return None
        if target_step is None:
            if alpha < 0:
                return f"alpha={alpha:g} is negative: this extrapolates backwards, before the base model"
            if alpha <= 1:
                return f"alpha={alpha:g} is within [0, 1]: this interpolates between the two models"
            return None
        if alpha < 0:
            return f"target step {target_step:g} lies before the base checkpoint (alpha={alpha:g}): this extrapolates backwards"
        if alpha <= 1:
            return f"target step {target_step:g} does not go beyond the second checkpoint (alpha={alpha:g}): this interpolates between the two"
        return None
    known = [s for s in steps if s is not None]
    if target_step is not None and known and target_step <= max(known):
        return f"target step {target_step:g} is inside the fitted window [{min(known)}, {max(known)}]: this interpolates"
    return None


def is_copied(name: str, dtype: torch.dtype | str, patterns: Iterable[str], extrapolate_all: bool = False) -> bool:
    """True for tensors taken verbatim from the latest checkpoint: non-floating ones always, norm
    weights (a pattern occurs in the lower-cased name) unless extrapolate_all. dtype: a torch dtype
    or a safetensors name ("BF16")."""
    if not (dtype in FLOAT_DTYPES if isinstance(dtype, str) else dtype.is_floating_point):
        return True
    if extrapolate_all:
        return False
    lowered = name.lower()
    return any(p.lower() in lowered for p in patterns)


# ----------------------------------------------------------------------------------------------
# Per-tensor arithmetic


def _native_kind(method: str, precise: bool, in_name: str, out_name: str) -> int | None:
    """The compiled kernel's storage kind when it computes this tensor (two-point, bf16 or fp32 in
    and out): torch.lerp's result bit for bit, without importing torch; None for the torch path."""
    if method == "two-point" and not precise and in_name == out_name and in_name in ("BF16", "F32") and native.available():
        return native.RAW_KINDS[in_name]
    return None


def _compute_dtype(dtype: torch.dtype, precise: bool) -> torch.dtype:
    import torch

    return torch.float64 if precise or dtype == torch.float64 else torch.float32


def _fused_ok(in_dtype: torch.dtype, out_dtype: torch.dtype, compute: torch.dtype) -> bool:
    """torch.lerp computes bf16/fp16 in float32 internally, so it is the float32 formula in one pass."""
    import torch

    if in_dtype != out_dtype:
        return False
    return in_dtype == compute or (compute == torch.float32 and in_dtype in (torch.bfloat16, torch.float16))


def lerp_into(out: torch.Tensor, base: torch.Tensor, second: torch.Tensor, alpha: float, compute: torch.dtype) -> torch.Tensor:
    """out = base + alpha (second - base) in `compute` precision (all 1-D, the same length)."""
    import torch

    if _fused_ok(base.dtype, out.dtype, compute):
        return torch.lerp(base, second, alpha, out=out)
    return out.copy_(torch.lerp(base.to(compute), second.to(compute), alpha))


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
    """base + alpha (second - base) in `compute` precision, returned in out_dtype."""
    b, s = base.reshape(-1), second.reshape(-1)
    return _chunked(lambda out, part: lerp_into(out, b[part], s[part], alpha, compute), base.shape, out_dtype, chunk)


def combine_tensor(tensors: Sequence[torch.Tensor], coefficients: Sequence[float], out_dtype: torch.dtype, compute: torch.dtype, chunk: int = 1 << 22) -> torch.Tensor:
    """sum_k c_k T_k (sum c_k = 1), as T_ref + sum_k c_k (T_k - T_ref) with ref = the last tensor."""
    flats = [t.reshape(-1) for t in tensors]
    return _chunked(lambda out, part: combine_into(out, [f[part] for f in flats], coefficients, compute), tensors[-1].shape, out_dtype, chunk)


def _all_finite(tensor: torch.Tensor) -> bool:
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


def _check_finite(name: str, tensor: torch.Tensor, inputs: Sequence[tuple[Source, torch.Tensor]]) -> None:
    if _all_finite(tensor):
        return
    bad = [str(src.path) for src, t in inputs if not _all_finite(t)]
    cause = f"{bad[0]} already holds inf/nan there" if bad else f"the result overflows {dtype_name(tensor.dtype)} (try --dtype float32)"
    raise RlvrxError(f"tensor {name}: extrapolation produced inf/nan values; {cause}")


@contextlib.contextmanager
def _torch_threads(requested: int | None, helpers: int):
    """Leave a core to each helper thread (writer, hasher): oversubscribed OpenMP threads are slower
    than fewer threads, by 2x on a busy 2-core machine."""
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


class _WriterThread:
    """Writes on one background thread, so computing chunk k+1 overlaps writing chunk k.

    Extrapolated tensors are computed chunk by chunk into a ring of `buffers` reused buffers: no
    allocation (and no page faults) per tensor, and peak memory is the ring. Copied tensors go as
    they are (memory-mapped views of the input, no copy). The first error raised by the writer is
    re-raised in the caller at the next call or at close().
    """

    def __init__(self, writer: ShardedWriter, buffer_bytes: int, buffers: int = 3):
        import queue
        import threading

        self.writer = writer
        self.buffer_bytes = buffer_bytes
        self.free: "queue.Queue" = queue.Queue()
        for _ in range(buffers):
            self.free.put(None)  # allocated on first use
        self.queue: "queue.Queue" = queue.Queue(maxsize=buffers + 1)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="rlvrx-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            name, start, tensor, buffer, check = item
            if self.error is None:
                try:
                    if check is not None:
                        check()
                    if start is None:
                        self.writer.write(name, tensor)
                    else:
                        self.writer.write_part(name, start, tensor)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    self.error = exc
            del tensor, check
            if buffer is not None:
                self.free.put(buffer)

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def buffer(self, nbytes: int) -> np.ndarray:
        """A free uint8 buffer of at least nbytes (waits while the writer is behind)."""
        self._raise()
        buffer = self.free.get()
        if buffer is None or buffer.size < nbytes:
            buffer = np.empty(max(nbytes, self.buffer_bytes), dtype=np.uint8)
        return buffer

    def put(self, name: str, tensor: torch.Tensor | RawValues, check: Callable[[], None] | None = None,
            start: int | None = None, buffer: np.ndarray | None = None) -> None:
        """Queue a whole tensor, or (start given) elements [start, start + numel) of it held in
        `buffer`, which returns to the ring once written; `check` runs on the writer thread first."""
        self._raise()
        self.queue.put((name, start, tensor, buffer, check))

    def close(self) -> None:
        """Wait for pending writes; re-raise a writer error."""
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def close_quietly(self) -> None:
        """On the error path: drop what is queued and stop the thread."""
        import queue

        self.error = self.error or RuntimeError("aborted")
        while True:
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.queue.put(None)
        self.thread.join()


# ----------------------------------------------------------------------------------------------
# The streaming loop


def _open_all(sources: Sequence[Source]) -> list[Checkpoint]:
    ckpts = [Checkpoint(s.path) for s in sources]
    latest = ckpts[-1]
    for ckpt in ckpts[:-1]:
        diff = compare_structure(latest, ckpt)
        if diff:
            raise CheckpointError(f"inputs do not match: {diff}")
    return ckpts


def _check_out(out: Path, sources: Sequence[Source], overwrite: bool) -> None:
    """Refuse an output that would replace an input, a directory holding one, a run directory, or
    anything but an earlier checkpoint (--overwrite replaces a model, never a directory of results)."""
    recover(out)  # a writer killed between atomic_dir's renames: its previous output comes back first
    resolved = out.resolve()
    for src in sources:
        if src.path.resolve() == resolved:
            raise UsageError(f"output {out} is one of the input checkpoints; choose another --out")
        if resolved in src.path.resolve().parents:
            raise UsageError(f"output {out} holds the input checkpoint {src.path}; choose another --out")
    if not out.exists():
        return
    if not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it (it is kept until the new one is complete)")
    check_replaceable(out)
    if not out.is_dir() or not (is_checkpoint_dir(out) or not any(out.iterdir())):
        raise UsageError(f"{out} exists and is not a checkpoint directory; --overwrite replaces only a model, choose another --out")


FINGERPRINT_BLOCKS = 16  # 4 KiB blocks sampled evenly from each weight file's data


def input_fingerprint(path: str | os.PathLike) -> dict:
    """A cheap identity of a checkpoint's weights (about 64 KiB read per file, not 1 GB): total
    bytes, newest mtime, and sha256 over each weight file's name, size, safetensors header (tensor
    names, dtypes, shapes, offsets) and FINGERPRINT_BLOCKS evenly spaced 4 KiB blocks of its data.
    Two checkpoints of one model differ in it; a full sha256 (--hash, or the trajectory manifest's)
    also catches an edit that misses every sampled block."""
    digest = hashlib.sha256()
    total, newest = 0, 0
    files = weight_files(path)
    for file in files:
        stat = file.stat()
        total += stat.st_size
        newest = max(newest, stat.st_mtime_ns)
        digest.update(f"{file.name}\0{stat.st_size}\0".encode())
        with open(file, "rb") as f:
            if file.name == INDEX_NAME:
                digest.update(f.read())
                continue
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            digest.update(head + f.read(min(size, 100 << 20)))
            data_start = 8 + size
            span = max(0, stat.st_size - data_start - 4096)
            for k in range(FINGERPRINT_BLOCKS):
                digest.update(os.pread(f.fileno(), 4096, data_start + span * k // max(1, FINGERPRINT_BLOCKS - 1)))
    modified = _dt.datetime.fromtimestamp(newest / 1e9, _dt.timezone.utc).isoformat(timespec="seconds") if files else None
    return {"bytes": total, "modified": modified, "fingerprint": digest.hexdigest()}


class _Hashes:
    """sha256 of the inputs without a known hash, on a worker thread (hashlib releases the GIL)."""

    def __init__(self, sources: Sequence[Source], enabled: bool):
        import threading

        self.stop = threading.Event()
        self.pool = None
        self.futures: list[Future | None] = [None] * len(sources)
        if enabled and not all(s.sha256 for s in sources):
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlvrx-hash")
            self.futures = [None if s.sha256 else self.pool.submit(checkpoint_sha256, s.path, self.stop) for s in sources]

    def close(self) -> None:
        if self.pool is not None:
            self.stop.set()
            self.pool.shutdown(wait=True, cancel_futures=True)


def _torch_dtype(name: str) -> torch.dtype:
    from rlvrx.checkpoint import DTYPES

    return DTYPES[name]


def _extrapolate_tensor(name: str, in_name: str, out_name: str, ckpts: Sequence[Checkpoint], sources: Sequence[Source],
                        method: str, coefficients: list[float], alpha: float | None, options: WeightsOptions,
                        background: "_WriterThread") -> None:
    """Compute one tensor chunk by chunk into the writer's ring of buffers: the compiled kernel on the
    inputs' memory maps where it applies, torch otherwise."""
    kind = _native_kind(method, options.precise, in_name, out_name)
    size = element_size(out_name)
    if kind is not None:
        flats = [ckpt.raw(name).data for ckpt in ckpts]
        lerp = native.library().rlvrx_lerp
    else:
        import torch

        flats = [ckpt.get(name).reshape(-1) for ckpt in ckpts]
        compute = _compute_dtype(_torch_dtype(in_name), options.precise)
    numel = len(flats[0])
    elements = max(1, options.chunk_elements)
    for i in range(0, numel, elements):
        j = min(numel, i + elements)
        buffer = background.buffer((j - i) * size)
        check = None
        if kind is not None:
            out_part = RawValues(out_name, buffer[: (j - i) * size].view(flats[0].dtype))
            bad = lerp(kind, flats[0].ctypes.data + i * size, flats[1].ctypes.data + i * size, alpha, out_part.data.ctypes.data, j - i)
            if bad:
                _raise_non_finite(name, out_part, [RawValues(in_name, f[i:j]) for f in flats], sources)
        else:
            out_part = torch.from_numpy(buffer[: (j - i) * size]).view(_torch_dtype(out_name))
            parts = [f[i:j] for f in flats]
            if method == "two-point":
                lerp_into(out_part, parts[0], parts[1], alpha, compute)
            else:
                combine_into(out_part, parts, coefficients, compute)
            check = functools.partial(_check_finite, name, out_part, list(zip(sources, parts)))
        background.put(name, out_part, check, start=i, buffer=buffer)
        del buffer, out_part, check
    if numel == 0:
        background.put(name, RawValues(out_name, np.zeros(0, dtype=np.uint8)))


def _raise_non_finite(name: str, out: RawValues, inputs: Sequence[RawValues], sources: Sequence[Source]) -> None:
    """The kernel counted inf/nan in its output: the same error as the torch path's check."""
    import torch

    def as_torch(values: RawValues) -> torch.Tensor:
        return torch.from_numpy(np.array(values.data)).view(_torch_dtype(values.dtype_name))

    _check_finite(name, as_torch(out), [(src, as_torch(v)) for src, v in zip(sources, inputs)])


def _run(
    sources: Sequence[Source],
    out: Path,
    method: str,
    coefficients: list[float],
    alpha: float | None,
    target_step: int | None,
    roles: Sequence[str],
    options: WeightsOptions,
    progress: Progress | None,
    warn: Warn | None,
    warnings: list[str],
) -> WeightsExtrapolation:
    start = time.perf_counter()
    out = Path(out)
    _check_out(out, sources, options.overwrite)
    ckpts = _open_all(sources)
    latest = ckpts[-1]
    infos = latest.infos()

    specs, plan = [], []
    for name, info in infos.items():
        copy = is_copied(name, info.dtype_name, options.copy_patterns, options.extrapolate_all)
        out_name = dtype_name(options.dtype) if (options.dtype is not None and info.is_float) else info.dtype_name
        specs.append((name, info.shape, out_name))
        plan.append((name, info.dtype_name, out_name, copy))
    # torch is imported only for what the compiled kernel does not do (--precise, --dtype, lstsq, fp16...)
    needs_torch = any(
        in_name != out_name if copy else _native_kind(method, options.precise, in_name, out_name) is None
        for _, in_name, out_name, copy in plan
    )

    result = WeightsExtrapolation(
        out=out,
        method=method,
        target_step=target_step,
        alpha=alpha,
        coefficients=coefficients,
        inputs=[],
        compute_dtype="float64" if options.precise else "float32",
        output_dtypes=sorted({DTYPE_INFO[d][1] for _, _, d, _ in plan}),
        warnings=warnings,
    )
    for msg in warnings:
        if warn is not None:
            warn(msg)

    total_bytes = sum(math.prod(shape) * element_size(d) for _, shape, d in specs)
    hashes = _Hashes(sources, options.hash_inputs)
    threads = _torch_threads(options.threads, 1 + (hashes.pool is not None)) if needs_torch else contextlib.nullcontext()
    try:
        with atomic_dir(out, overwrite=options.overwrite) as tmp, threads:
            writer = ShardedWriter(tmp, specs, max_shard_bytes=options.max_shard_bytes)
            elements = max(1, options.chunk_elements)
            background = _WriterThread(writer, elements * max(element_size(d) for _, _, d, _ in plan) if plan else 0)
            try:
                for name, in_name, out_name, copy in plan:
                    if copy:
                        tensor = latest.raw(name) if in_name == out_name else latest.get(name).to(_torch_dtype(out_name))
                        result.copied.append(name)
                        background.put(name, tensor)
                        del tensor
                    else:
                        _extrapolate_tensor(name, in_name, out_name, ckpts, sources, method, coefficients, alpha, options, background)
                        result.extrapolated.append(name)
                    result.bytes_written += math.prod(infos[name].shape) * element_size(out_name)
                    if progress is not None:
                        progress(name, result.bytes_written, total_bytes)
                background.close()
                writer.finish()
            finally:
                if background.thread.is_alive():
                    background.close_quietly()
                writer.abort()
            copy_aux_files(latest.path, tmp)
            for src, role, fut in zip(sources, roles, hashes.futures):
                digest, origin = (fut.result(), "computed") if fut is not None else (src.sha256, "manifest" if src.sha256 else None)
                result.inputs.append(
                    {"role": role, "step": src.step, "path": str(src.path.resolve()), **input_fingerprint(src.path),
                     "sha256": digest, "sha256_from": origin}
                )
            result.seconds = time.perf_counter() - start
            (tmp / PROVENANCE).write_text(json.dumps(result.provenance(), indent=2) + "\n")
    finally:
        for ckpt in ckpts:
            ckpt.close()
        hashes.close()
    result.seconds = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------
# Public entry points


def extrapolate_two_point(
    base: Source | str | os.PathLike,
    second: Source | str | os.PathLike,
    alpha: float,
    out: str | os.PathLike,
    *,
    target_step: int | None = None,
    options: WeightsOptions | None = None,
    progress: Progress | None = None,
    warn: Warn | None = None,
) -> WeightsExtrapolation:
    """W = W_base + alpha (W_second - W_base), streamed into the checkpoint dir `out`."""
    base = base if isinstance(base, Source) else Source(Path(base))
    second = second if isinstance(second, Source) else Source(Path(second))
    if not math.isfinite(alpha):
        raise UsageError(f"alpha must be a finite number, got {alpha}")
    note = interpolation_warning("two-point", [base.step, second.step], target_step, alpha)
    return _run(
        [base, second], Path(out), "two-point", [1.0 - alpha, alpha], float(alpha), target_step,
        ("base", "second"), options or WeightsOptions(), progress, warn, [note] if note else [],
    )


def extrapolate_lstsq(
    sources: Sequence[Source],
    target_step: int,
    out: str | os.PathLike,
    *,
    options: WeightsOptions | None = None,
    progress: Progress | None = None,
    warn: Warn | None = None,
) -> WeightsExtrapolation:
    """Per-parameter least-squares line through `sources` (each with a step), evaluated at target_step.
    Norm and non-floating tensors are copied from the source with the largest step."""
    sources = sorted(sources, key=lambda s: (s.step is None, s.step))
    if any(s.step is None for s in sources):
        raise UsageError("a least-squares fit needs the step of every checkpoint")
    coefficients = lstsq_coefficients([s.step for s in sources], target_step)
    note = interpolation_warning("lstsq", [s.step for s in sources], target_step, None)
    roles = [f"fit[{i}]" for i in range(len(sources))]
    return _run(
        sources, Path(out), "lstsq", coefficients, None, target_step, roles,
        options or WeightsOptions(), progress, warn, [note] if note else [],
    )


# ----------------------------------------------------------------------------------------------
# Run directories


def resolve_alpha(base: int | None, second: int | None, target: int | None, alpha: float | None) -> tuple[float, int | None]:
    """(alpha, target) from --target or --alpha: alpha = (T - S0) / (S1 - S0); T is derived from alpha when integral."""
    if alpha is not None and not math.isfinite(alpha):
        raise UsageError(f"--alpha {alpha}: must be a finite number")
    if base is not None and second is not None:
        if target is not None and alpha is not None:
            raise UsageError("give --target or --alpha, not both (alpha = (target - base) / (second - base))")
        if target is not None:
            return two_point_alpha(base, second, target), target
        if alpha is None:
            raise UsageError("give --target T (alpha = (T - base) / (second - base)) or --alpha")
        two_point_alpha(base, second, base)  # validates the steps
        value = base + alpha * (second - base)
        return alpha, int(round(value)) if abs(value - round(value)) < 1e-9 else None
    if alpha is None:
        raise UsageError("two model directories without steps need --alpha (or --base S0 --second S1 --target T)")
    return alpha, target


def default_output(run: str | os.PathLike, target_step: int) -> Path:
    from rlvrx.trajectory import step_dir_name

    return Path(run) / "extrapolated" / step_dir_name(target_step)


def parse_window(text: str) -> tuple[int, int]:
    """'A:B' (either side may be empty) -> (A, B) inclusive."""
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        a = int(lo) if lo.strip() else 0
        b = int(hi) if hi.strip() else 2**62
    except ValueError:
        raise UsageError(f"--window {text!r}: expected A:B with integer steps, e.g. 100:400 (or 100: for all from 100)") from None
    if a > b:
        raise UsageError(f"--window {text!r}: start {a} is after end {b}")
    return a, b


def check_registrable(run: str | os.PathLike, target_step: int | None, overwrite: bool) -> None:
    """Fail before any work when `--register` could not record the result at target_step."""
    from rlvrx.trajectory import Trajectory

    if target_step is None:
        raise UsageError("--register needs an integer target step (--target)")
    traj = Trajectory.load(run, create=True)
    for entry in traj:
        if entry.step == target_step:
            if entry.kind != "extrapolated":
                raise UsageError(
                    f"step {target_step} in {traj.manifest} is a real checkpoint ({entry.kind}: {entry.path}); "
                    "an extrapolated model cannot replace it; drop --register or pick another --target"
                )
            if not overwrite:
                raise UsageError(
                    f"step {target_step} in {traj.manifest} already holds an extrapolated model ({entry.path}); pass --overwrite to replace it"
                )


def register_result(run: str | os.PathLike, result: WeightsExtrapolation, hash: bool = True) -> None:
    """Add the output to RUN/trajectory.json as kind `extrapolated` at its target step."""
    from rlvrx.trajectory import Trajectory

    traj = Trajectory.load(run, create=True)
    meta = {"method": result.method, "from_steps": [i["step"] for i in result.inputs]}
    if result.alpha is not None:
        meta["alpha"] = result.alpha
    traj.add(result.target_step, result.out, kind="extrapolated", hash=hash, replace=True, meta=meta)
    traj.save()
    result.registered = True


def sources_from_run(run: str | os.PathLike, steps: Sequence[int]) -> list[Source]:
    from rlvrx.trajectory import Trajectory

    traj = Trajectory.load(run)
    return [Source(traj.path_of(step), step, traj.get(step).sha256) for step in steps]


def window_sources(run: str | os.PathLike, window: tuple[int, int] | None) -> list[Source]:
    """The run's base/rl checkpoints (extrapolated ones are never fitted) inside the window."""
    from rlvrx.trajectory import Trajectory

    traj = Trajectory.load(run)
    entries = traj.select(kinds=("base", "rl"), window=window)
    if len(entries) < 2:
        where = f"in window {window[0]}:{window[1]}" if window else ""
        raise UsageError(
            f"{traj.manifest}: least squares needs at least 2 base/rl checkpoints {where}, found "
            f"{[e.step for e in entries]} (steps: {traj.steps})"
        )
    return [Source(traj.resolve(e), e.step, e.sha256) for e in entries]


def parse_size(text: str) -> int:
    """'500MB', '2GiB', '5GB', '1000000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise UsageError(f"size {text!r}: expected a positive number with an optional unit, e.g. 5GB, 500MB, 2GiB")
    return int(value * units[unit])


def extrapolate_weights(
    run: str | os.PathLike | None = None,
    *,
    base: int | None = None,
    second: int | None = None,
    target: int | None = None,
    alpha: float | None = None,
    base_path: str | os.PathLike | None = None,
    second_path: str | os.PathLike | None = None,
    fit: str = "two-point",
    window: tuple[int, int] | None = None,
    out: str | os.PathLike | None = None,
    register: bool = False,
    options: WeightsOptions | None = None,
    progress: Progress | None = None,
    warn: Warn | None = None,
) -> WeightsExtrapolation:
    """The `rlvrx extrapolate weights` request: checkpoints by step from RUN's trajectory, or two
    model directories; two-point or least squares; optional registration in the trajectory."""
    options = options or WeightsOptions()
    if any(not pattern.strip() for pattern in options.copy_patterns):
        raise UsageError("--copy-pattern '': an empty pattern matches every tensor name (nothing would be extrapolated); give a name substring such as norm")
    if fit not in METHODS:
        raise UsageError(f"--fit {fit!r}: use one of {', '.join(METHODS)}")
    if register and run is None:
        raise UsageError("--register needs the RUN directory whose trajectory.json should record the result")

    if fit == "lstsq":
        given = [flag for flag, value in (("--base", base), ("--second", second), ("--alpha", alpha), ("--base-path", base_path), ("--second-path", second_path)) if value is not None]
        if given:
            raise UsageError(f"{given[0]} is for the two-point method; --fit lstsq takes RUN, --window A:B and --target")
        if run is None or target is None:
            raise UsageError("--fit lstsq needs RUN and --target (and usually --window A:B)")
        sources = window_sources(run, window)
        out = Path(out) if out is not None else default_output(run, target)
        if register:
            check_registrable(run, target, options.overwrite)
        result = extrapolate_lstsq(sources, target, out, options=options, progress=progress, warn=warn)
    else:
        if window is not None:
            raise UsageError("--window is for --fit lstsq; the two-point method uses --base and --second")
        if (base_path is None) != (second_path is None):
            raise UsageError("give both --base-path and --second-path (two model directories), or neither")
        if base_path is None:
            if run is None or base is None or second is None:
                raise UsageError("give RUN with --base S0 --second S1 (steps in its trajectory), or --base-path/--second-path with --alpha")
            src_base, src_second = sources_from_run(run, [base, second])
        else:
            src_base, src_second = Source(Path(base_path), base), Source(Path(second_path), second)
        alpha, target = resolve_alpha(base, second, target, alpha)
        if out is None:
            if run is None or target is None:
                raise UsageError("give --out DIR (the default RUN/extrapolated/step_T needs RUN and an integer target step)")
            out = default_output(run, target)
        if register:
            check_registrable(run, target, options.overwrite)
        result = extrapolate_two_point(src_base, src_second, alpha, out, target_step=target, options=options, progress=progress, warn=warn)
    if register:
        register_result(run, result, hash=options.hash_registered)
    return result
