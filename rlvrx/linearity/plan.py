"""Planning a weight-linearity run: which tensors, how they split into shards, samples and blocks."""

from __future__ import annotations

import fnmatch
import hashlib
from typing import Sequence

import numpy as np

from rlvrx.io.dtypes import DTYPE_INFO, TensorInfo
from rlvrx.io.reader import Checkpoint
from rlvrx.io.identity import compare_structure
from rlvrx.errors import CheckpointError, UsageError
from rlvrx.linearity import stats

_BLOCK = 1 << 18  # parameters per kernel call (the kernel itself works in L1-sized tiles)
MAX_CHECKPOINTS = 4096  # the compiled kernel's limit (_native.c MAX_K)


def float_tensors(infos: dict[str, TensorInfo]) -> list[str]:
    return [name for name, info in infos.items() if info.is_float]


def structure_fingerprint(infos: dict[str, TensorInfo]) -> str:
    digest = hashlib.sha256()
    for name, info in infos.items():
        digest.update(f"{name}:{list(info.shape)}:torch.{DTYPE_INFO[info.dtype_name][1]};".encode())
    return digest.hexdigest()[:16]


def partition_tensors(sizes: Sequence[tuple[str, int]], n_shards: int) -> list[list[str]]:
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


def open_checked(checkpoints: Sequence[tuple[int, Checkpoint]]) -> tuple[list[int], list[Checkpoint]]:
    steps = stats.check_steps([s for s, _ in checkpoints])
    if len(steps) > MAX_CHECKPOINTS:
        raise UsageError(f"weight linearity takes at most {MAX_CHECKPOINTS} checkpoints, got {len(steps)}; pass fewer checkpoints")
    ckpts = [c for _, c in checkpoints]
    for ckpt in ckpts[1:]:
        diff = compare_structure(ckpts[0], ckpt)
        if diff:
            raise CheckpointError(diff)
    return steps, ckpts


def matching_tensors(infos: dict[str, TensorInfo], patterns: Sequence[str], what: str = "tensors") -> list[str]:
    """The floating-point tensors whose names match any of the glob patterns (all of them for no pattern)."""
    names = float_tensors(infos)
    if not patterns:
        return names
    chosen = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not chosen:
        example = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UsageError(f"{what} {' '.join(patterns)} match{'es' * (len(patterns) == 1)} no floating-point tensor (names look like {example})")
    return chosen


def selected_tensors(
    checkpoints: Sequence[tuple[int, Checkpoint]], shard: tuple[int, int] | None = None, patterns: Sequence[str] = ()
) -> list[tuple[str, int]]:
    """(name, numel) of the floating-point tensors this run (or shard) analyses, in checkpoint order;
    patterns: only the tensors matching one of these globs."""
    infos = checkpoints[0][1].infos()
    sizes = [(name, infos[name].numel) for name in matching_tensors(infos, patterns)]
    if shard is None:
        return sizes
    chosen = set(partition_tensors(sizes, shard[1])[shard[0]])
    return [(name, size) for name, size in sizes if name in chosen]
