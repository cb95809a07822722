"""Weight extrapolation: predict the checkpoint at step T from earlier ones, one tensor at a time.

Two-point: W_T = W_base + alpha (W_second - W_base), alpha = (T - S0) / (S1 - S0).
Least squares: each parameter's OLS line through the K checkpoints of a window, evaluated at T. The
fitted value at T is a fixed linear combination of the K values, sum_k c_k W_k with
c_k = 1/K + (T - t_mean)(t_k - t_mean) / S_tt, so it streams like the two-point case; it is
computed as W_ref + sum_k c_k (W_k - W_ref) (ref = latest checkpoint, sum c_k = 1), which keeps
float32 accurate when checkpoints are close together.
Rank-1 (RELEX, rlvrx.extrapolate.rank1): per tensor, a first pass over the window's drifts from the
base gives that tensor's combination weights (top singular direction in time, its coefficient's line
at T); the second pass streams the combination like least squares. A window of one checkpoint is the
two-point jump from the base, bit for bit.

Inputs are read through memory maps (no copies). The two-point case is torch.lerp's arithmetic:
float32 inside for 16-bit types, one fused multiply-add per value; the result equals the float64
formula rounded to the output dtype for dyadic alphas such as -0.5, 2, 3, and is within one ulp of
it otherwise; --precise computes in float64. The torch path is rlvrx.formulas.jump, the one jump
arithmetic of every command. For bf16 and fp32 (in = out) a compiled kernel (rlvrx.kernels) does it, bit for bit torch.lerp's result, without importing torch (whose import
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
import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from rlvrx import kernels
from rlvrx.errors import UsageError
from rlvrx.extrapolate.arithmetic import check_finite, combine_into, compute_dtype, native_kind, raise_non_finite, torch_dtype, torch_threads
from rlvrx.extrapolate.inputs import (
    check_output,
    open_inputs,
)
from rlvrx.extrapolate.rank1 import mapped_tensor, rank1_weights
from rlvrx.extrapolate.options import PROVENANCE, Progress, Source, Warn, WeightsExtrapolation, WeightsOptions
from rlvrx.formulas import interpolation_warning, is_copied, jump, lstsq_coefficients, two_point_alpha
from rlvrx.io.atomic import atomic_dir
from rlvrx.io.background_writer import BackgroundWriter
from rlvrx.io.dtypes import DTYPE_INFO, RawValues, dtype_name, element_size
from rlvrx.io.identity import InputHashes, input_fingerprint
from rlvrx.io.reader import Checkpoint
from rlvrx.io.writer import ShardedWriter, copy_aux_files


def _extrapolate_tensor(
    name: str,
    in_name: str,
    out_name: str,
    ckpts: Sequence[Checkpoint],
    sources: Sequence[Source],
    method: str,
    coefficients: list[float],
    alpha: float | None,
    options: WeightsOptions,
    background: BackgroundWriter,
    target_step: int | None = None,
    rank: int = 1,
) -> dict | None:
    """Compute one tensor chunk by chunk into the writer's ring of buffers: the compiled kernel on the
    inputs' memory maps where it applies, torch otherwise. rank1: a first pass fits this tensor's
    coefficients (returned as its provenance entry), the second combines like least squares."""
    kind = native_kind(method, options.precise, in_name, out_name)
    entry = None
    size = element_size(out_name)
    if kind is not None:
        flats = [ckpt.raw(name).data for ckpt in ckpts]
        lerp = kernels.library().rlvrx_lerp
    else:
        import torch

        compute = compute_dtype(torch_dtype(in_name), options.precise)
        if method == "rank1":
            flats = [mapped_tensor(ckpt.raw(name)) for ckpt in ckpts]
            steps = [s.step for s in sources]
            coefficients, entry = rank1_weights(name, flats, steps, target_step, rank, options.chunk_elements)  # type: ignore[arg-type]
        else:
            flats = [ckpt.get(name).reshape(-1) for ckpt in ckpts]
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
                raise_non_finite(name, out_part, [RawValues(in_name, f[i:j]) for f in flats], sources)
        else:
            out_part = torch.from_numpy(buffer[: (j - i) * size]).view(torch_dtype(out_name))
            parts = [f[i:j] for f in flats]
            if method == "two-point":
                jump(parts[0], parts[1], alpha, compute=compute, out=out_part)
            else:
                combine_into(out_part, parts, coefficients, compute)
            check = functools.partial(check_finite, name, out_part, list(zip(sources, parts)))
        background.put(name, out_part, check, start=i, buffer=buffer)
        del buffer, out_part, check
    if numel == 0:
        background.put(name, RawValues(out_name, np.zeros(0, dtype=np.uint8)))
    return entry


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
    rank: int = 1,
) -> WeightsExtrapolation:
    start = time.perf_counter()
    out = Path(out)
    check_output(out, sources, options.overwrite)
    ckpts = open_inputs(sources)
    latest = ckpts[-1]
    infos = latest.infos()

    specs, plan = [], []
    for name, info in infos.items():
        copy = is_copied(name, info.dtype_name, options.copy_patterns, options.extrapolate_all)
        out_name = dtype_name(options.dtype) if (options.dtype is not None and info.is_float) else info.dtype_name
        specs.append((name, info.shape, out_name))
        plan.append((name, info.dtype_name, out_name, copy))
    # torch is imported only for what the compiled kernel does not do (--precise, --dtype, lstsq, fp16...)
    # rank1 on a window of one checkpoint is the two-point jump from the base: the same arithmetic, the same bits
    arith = "two-point" if method == "rank1" and len(sources) == 2 else method
    needs_torch = any(in_name != out_name if copy else native_kind(arith, options.precise, in_name, out_name) is None for _, in_name, out_name, copy in plan)

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
        rank=rank if method == "rank1" else None,
    )
    for msg in warnings:
        if warn is not None:
            warn(msg)

    total_bytes = sum(math.prod(shape) * element_size(d) for _, shape, d in specs)
    hashes = InputHashes(sources, options.hash_inputs)
    threads = torch_threads(options.threads, 1 + (hashes.pool is not None)) if needs_torch else contextlib.nullcontext()
    try:
        with atomic_dir(out, overwrite=options.overwrite) as tmp, threads:
            writer = ShardedWriter(tmp, specs, max_shard_bytes=options.max_shard_bytes)
            elements = max(1, options.chunk_elements)
            background = BackgroundWriter(writer, elements * max(element_size(d) for _, _, d, _ in plan) if plan else 0)
            try:
                for name, in_name, out_name, copy in plan:
                    if copy:
                        tensor = latest.raw(name) if in_name == out_name else latest.get(name).to(torch_dtype(out_name))
                        result.copied.append(name)
                        background.put(name, tensor)
                        del tensor
                    else:
                        entry = _extrapolate_tensor(name, in_name, out_name, ckpts, sources, arith, coefficients, alpha, options, background, target_step, rank)
                        if method == "rank1" and entry is None:
                            entry = {"explained_variance": [1.0], "r2": [1.0], "sigma": [None], "weights": [alpha]}
                        if entry is not None:
                            result.tensor_fits[name] = entry
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
                    {"role": role, "step": src.step, "path": str(src.path.resolve()), **input_fingerprint(src.path), "sha256": digest, "sha256_from": origin}
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
        [base, second],
        Path(out),
        "two-point",
        [1.0 - alpha, alpha],
        float(alpha),
        target_step,
        ("base", "second"),
        options or WeightsOptions(),
        progress,
        warn,
        [note] if note else [],
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
        sources,
        Path(out),
        "lstsq",
        coefficients,
        None,
        target_step,
        roles,
        options or WeightsOptions(),
        progress,
        warn,
        [note] if note else [],
    )


def extrapolate_rank1(
    base: Source,
    window: Sequence[Source],
    target_step: int,
    out: str | os.PathLike,
    *,
    rank: int = 1,
    options: WeightsOptions | None = None,
    progress: Progress | None = None,
    warn: Warn | None = None,
) -> WeightsExtrapolation:
    """RELEX's temporal rank-r extrapolation (rlvrx.extrapolate.rank1): per tensor, the top-r
    singular components of the drifts theta_t - theta_base over `window` (each with a step, the base
    excluded), each coefficient extrapolated along its least-squares line to target_step. One window
    checkpoint gives the two-point jump from the base. Norm and non-floating tensors come from the
    latest window checkpoint."""
    window = sorted(window, key=lambda s: (s.step is None, s.step))
    if base.step is None or any(s.step is None for s in window):
        raise UsageError("a rank-1 fit needs the step of the base and of every window checkpoint")
    if not window:
        raise UsageError("a rank-1 fit needs at least 1 checkpoint in the window besides the base")
    steps = [s.step for s in window]
    if base.step in steps or len(set(steps)) != len(steps):
        raise UsageError(f"the window's steps {steps} must be distinct and exclude the base step {base.step}")
    if not 1 <= rank <= len(window):
        raise UsageError(f"--rank {rank}: must be between 1 and the number of window checkpoints ({len(window)})")
    alpha = two_point_alpha(base.step, steps[0], target_step) if len(window) == 1 else None
    note = interpolation_warning("lstsq", [base.step, *steps], target_step, None)
    roles = ["base", *(f"window[{i}]" for i in range(len(window)))]
    return _run(
        [base, *window],
        Path(out),
        "rank1",
        [],
        alpha,
        target_step,
        roles,
        options or WeightsOptions(),
        progress,
        warn,
        [note] if note else [],
        rank=rank,
    )
