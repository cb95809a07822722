"""The weight-space error of a predicted checkpoint against the real one, relative to the real drift
since a reference (the window's end): ||pred - real||_F / ||real - ref||_F over every floating
tensor, accumulated in float64 one tensor (in chunks) at a time."""

from __future__ import annotations

import math
import os

from rlvrx.errors import CheckpointError
from rlvrx.io.identity import compare_structure
from rlvrx.io.reader import Checkpoint

CHUNK = 1 << 22


def squared_distance(a: Checkpoint, b: Checkpoint) -> float:
    """sum over floating tensors of ||a - b||^2 (float64)."""
    import torch

    total = []
    for name, info in b.infos().items():
        if not info.is_float:
            continue
        x, y = a.get(name).reshape(-1), b.get(name).reshape(-1)
        for i in range(0, y.numel(), CHUNK):
            total.append(float((x[i : i + CHUNK].to(torch.float64) - y[i : i + CHUNK].to(torch.float64)).square().sum()))
    return math.fsum(total)


def relative_error(pred: str | os.PathLike, real: str | os.PathLike, ref: str | os.PathLike) -> dict:
    """{"error": ||pred - real||, "drift": ||real - ref||, "relative": their ratio (None for zero drift)}."""
    with Checkpoint(pred) as p, Checkpoint(real) as r, Checkpoint(ref) as f:
        for other in (p, f):
            diff = compare_structure(r, other)
            if diff:
                raise CheckpointError(f"{other.path} does not match {r.path}: {diff}")
        error, drift = math.sqrt(squared_distance(p, r)), math.sqrt(squared_distance(r, f))
    return {"error": error, "drift": drift, "relative": error / drift if drift > 0 else None}
