"""The RL-Extra jump, W <- W_a + alpha (W_b - W_a), on whatever piece of a tensor a rank holds.

The formula is elementwise, so under FSDP2 each rank applies it to its own local shard of every
DTensor parameter and the result is exactly the sharded form of the full-tensor jump: no gather, no
communication. Which tensors jump, and the arithmetic, are the native trainer's: norm weights keep
W_b under norms=copy (rlvrx.formulas.is_copied), and the arithmetic is rlvrx.formulas.jump,
the same bits as `rlvrx extrapolate weights` and the native RL-Extra jump.

Used inside verl workers (rl_extra.py) and by the restart loop on HF checkpoints (extrapolate_checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlvrx.formulas import DEFAULT_COPY_PATTERNS, is_copied, jump


def jump_factor(m: int, n: int) -> float:
    """(m + n) / m: a jump of n steps ahead along the drift of the last m."""
    if m < 1 or n < 0:
        raise ValueError(f"RL-Extra needs m >= 1 and n >= 0, got m={m}, n={n}")
    return (m + n) / m


def kept(name: str, dtype: torch.dtype, norms: str = "copy") -> bool:
    """True for tensors the jump leaves at W_b: non-float ones, and norm weights under norms=copy."""
    if norms not in ("copy", "extrapolate"):
        raise ValueError(f"norms must be copy or extrapolate, got {norms!r}")
    return is_copied(name, dtype, DEFAULT_COPY_PATTERNS, extrapolate_all=norms == "extrapolate")


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: a DTensor's local shard, else the tensor itself."""
    data = param.data if isinstance(param, torch.nn.Parameter) else param
    return data._local_tensor if hasattr(data, "_local_tensor") else data


@torch.no_grad()
def snapshot_local(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of this rank's local shards of every parameter (the anchor W_a)."""
    return {name: local_tensor(p).detach().to("cpu", copy=True) for name, p in module.named_parameters()}


@torch.no_grad()
def apply_jump_local(module: torch.nn.Module, anchor: dict[str, torch.Tensor], factor: float, norms: str = "copy") -> dict:
    """Jump this rank's local shards in place from `anchor`; returns {"jumped", "kept", "max_abs_change"}."""
    stats = {"jumped": 0, "kept": 0, "max_abs_change": 0.0}
    for name, param in module.named_parameters():
        if name not in anchor:
            raise KeyError(f"parameter {name} has no anchor snapshot; snapshot the anchor before the cycle")
        local = local_tensor(param)
        if kept(name, local.dtype, norms):
            stats["kept"] += 1
            continue
        new = jump(anchor[name], local, factor)
        if local.numel():
            stats["max_abs_change"] = max(stats["max_abs_change"], float((new - local).abs().max()))
        local.copy_(new)
        stats["jumped"] += 1
    return stats


def extrapolate_checkpoint(anchor_dir, current_dir, out_dir, factor: float, norms: str = "copy", overwrite: bool = False) -> Path:
    """Stream the jump over two HF checkpoint dirs into `out_dir` (atomic; one tensor in memory at a time)."""
    from rlvrx.errors import CheckpointError
    from rlvrx.io.identity import compare_structure
    from rlvrx.io.reader import Checkpoint
    from rlvrx.io.writer import write_checkpoint

    anchor, current = Checkpoint(anchor_dir), Checkpoint(current_dir)
    diff = compare_structure(anchor, current)
    if diff:
        raise CheckpointError(diff)
    infos = current.infos()
    specs = [(name, info.shape, info.dtype) for name, info in infos.items()]

    def tensors():
        for name, info in infos.items():
            cur = current.get(name)
            yield name, cur if kept(name, info.dtype, norms) else jump(anchor.get(name), cur, factor)

    try:
        return write_checkpoint(Path(out_dir), specs, tensors(), source_dir=Path(current_dir), overwrite=overwrite)
    finally:
        anchor.close()
        current.close()
