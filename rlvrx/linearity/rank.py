"""Spatial rank-1 structure of the updates (AlphaRL's "rank-1 dominance"), one 2-D weight at a time.

For each 2-D floating weight and each checkpoint t after the first of the window (the base),
Delta_t = W_t - W_base and its top singular triplet (sigma1, u1, v1), by subspace (block power)
iteration warm-started from the previous checkpoint's vectors:
- rank-1 energy sigma1^2 / ||Delta_t||_F^2 (the tensor's value: at the last checkpoint, the whole update);
- stability: |cos| of u1 and v1 at each earlier checkpoint against the last checkpoint's (the
  tensor's value: their mean; None with a single checkpoint after the base);
- the R^2 of sigma1 against step (None with fewer than 2 checkpoints after the base).

Memory: one tensor's Delta at a time (float64 up to FLOAT64_LIMIT elements, float32 beyond), plus
its top vectors for every checkpoint. `write_rank1` writes the AlphaRL rank-1 model
W_base + ||Delta||_F u1 v1^T (= (||Delta||_F / sigma1) sigma1 u1 v1^T) for every 2-D weight, every
other tensor as at the step, as an atomic HF checkpoint.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from rlvrx.errors import UsageError
from rlvrx.formulas import ols_line
from rlvrx.io.reader import Checkpoint
from rlvrx.linearity.naming import layer_of, module_of

if TYPE_CHECKING:
    import torch

FLOAT64_LIMIT = 1 << 24  # elements of Delta computed in float64; larger tensors use float32
BLOCK = 8  # vectors of the subspace iteration (convergence goes as (sigma_{BLOCK+1} / sigma_1)^2 per round)


def top_singular_triplet(
    delta: torch.Tensor, start: torch.Tensor | None = None, max_iter: int = 500, tol: float = 1e-12, seed: int = 0
) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sigma1, u1, v1, V) of a 2-D tensor by subspace iteration on a block of right vectors; V (n x k)
    is the final block, to warm-start the next call (`start`). Stops when u1 changes by less than
    `tol` in 1 - |cos|, or after max_iter rounds. sigma1 = 0 (and zero vectors) for a zero tensor."""
    import torch

    if delta.dim() != 2:
        raise UsageError(f"delta must be a 2-D tensor, got shape {list(delta.shape)}")
    m, n = delta.shape
    k = min(BLOCK, m, n)
    if k == 0 or not bool(delta.any()):
        return 0.0, torch.zeros(m, dtype=delta.dtype), torch.zeros(n, dtype=delta.dtype), torch.zeros((n, max(k, 1)), dtype=delta.dtype)
    if start is not None and start.shape == (n, k):
        block = start.to(delta.dtype)
    else:
        block = torch.randn((n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(delta.dtype)
    u_prev = None
    for _ in range(max_iter):
        q, _ = torch.linalg.qr(delta @ block)  # m x k, orthonormal basis of the left subspace
        small = q.T @ delta  # k x n
        ub, s, vt = torch.linalg.svd(small.double(), full_matrices=False)
        u = q.double() @ ub[:, 0]
        block = vt.T.to(delta.dtype)
        if u_prev is not None and 1 - abs(float(u @ u_prev)) < tol:
            break
        u_prev = u
    v = vt[0]
    return float(s[0]), u, v, block


@dataclass
class TensorRank:
    """One 2-D weight across the window's checkpoints after the base."""

    name: str
    module: str
    layer: int | None
    shape: tuple[int, ...]
    sigma1: list[float] = field(default_factory=list)
    frobenius: list[float] = field(default_factory=list)
    energy: list[float | None] = field(default_factory=list)
    u_cos: list[float | None] = field(default_factory=list)  # |cos(u1_t, u1_last)|, per checkpoint
    v_cos: list[float | None] = field(default_factory=list)

    def summary(self, steps: Sequence[int]) -> dict:
        earlier_u = [c for c in self.u_cos[:-1] if c is not None]
        earlier_v = [c for c in self.v_cos[:-1] if c is not None]
        r2 = None
        if len(steps) >= 2 and any(self.sigma1):
            r2 = ols_line(list(steps), self.sigma1)[2]
            r2 = None if math.isnan(r2) else r2
        return {
            "name": self.name,
            "module": self.module,
            "layer": self.layer,
            "shape": list(self.shape),
            "rank1_energy": self.energy[-1],
            "u_stability": statistics.fmean(earlier_u) if earlier_u else None,
            "v_stability": statistics.fmean(earlier_v) if earlier_v else None,
            "sigma1_r2": r2,
            "sigma1": self.sigma1,
            "frobenius": self.frobenius,
            "energy": self.energy,
            "u_cos": self.u_cos,
            "v_cos": self.v_cos,
        }


def _delta(base: Checkpoint, ckpt: Checkpoint, name: str) -> torch.Tensor:
    import torch

    b = base.get(name)
    dtype = torch.float64 if b.numel() <= FLOAT64_LIMIT else torch.float32
    return ckpt.get(name).to(dtype).sub_(b.to(dtype))


def matrix_weights(ckpt: Checkpoint) -> list[str]:
    """The 2-D floating tensors (the ones with a singular value decomposition)."""
    return [name for name, info in ckpt.infos().items() if info.is_float and len(info.shape) == 2]


def analyze_rank(checkpoints: Sequence[tuple[int, Checkpoint]], progress: Callable[[str, int, int], None] | None = None) -> dict:
    """The rank-1 diagnostics of every 2-D weight over `checkpoints` (the first is the base; at least
    one more). Returns the summary dict (public keys, by module, by layer, per tensor, per step)."""
    if len(checkpoints) < 2:
        raise UsageError(f"rank diagnostics need a base and at least 1 later checkpoint, got {len(checkpoints)}")
    steps = [s for s, _ in checkpoints]
    base = checkpoints[0][1]
    later = [c for _, c in checkpoints[1:]]
    names = matrix_weights(base)
    records = []
    for i, name in enumerate(names):
        record = TensorRank(name, module_of(name), layer_of(name), tuple(base.info(name).shape))
        start = None
        vectors = []
        for ckpt in later:
            delta = _delta(base, ckpt, name)
            sigma, u, v, start = top_singular_triplet(delta, start)
            fro = float(delta.double().square().sum()) if delta.numel() else 0.0
            record.sigma1.append(sigma)
            record.frobenius.append(math.sqrt(fro))
            record.energy.append(sigma**2 / fro if fro > 0 else None)
            vectors.append((u, v) if sigma > 0 else None)
            del delta
        last = vectors[-1]
        for pair in vectors:
            ok = pair is not None and last is not None
            record.u_cos.append(abs(float(pair[0] @ last[0])) if ok else None)  # type: ignore[index]
            record.v_cos.append(abs(float(pair[1] @ last[1])) if ok else None)  # type: ignore[index]
        records.append(record)
        if progress is not None:
            progress(name, i + 1, len(names))
    return summarize_rank(steps, records)


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


KEYS = ("rank1_energy", "u_stability", "v_stability", "sigma1_r2")


def _group(tensors: Sequence[dict]) -> dict:
    return {"n_tensors": len(tensors), **{f"median_{key}": _median([t[key] for t in tensors]) for key in KEYS}}


def summarize_rank(steps: Sequence[int], records: Sequence[TensorRank]) -> dict:
    later = list(steps[1:])
    tensors = [r.summary(later) for r in records]
    modules = sorted({t["module"] for t in tensors})
    layers = sorted({t["layer"] for t in tensors}, key=lambda x: (x is None, x if x is not None else 0))
    per_step = [{"step": step, "median_rank1_energy": _median([t["energy"][i] for t in tensors])} for i, step in enumerate(later)]
    return {
        "base_step": steps[0],
        "steps": later,
        **_group(tensors),
        "by_module": [{"module": m, **_group([t for t in tensors if t["module"] == m])} for m in modules],
        "by_layer": [{"layer": layer, **_group([t for t in tensors if t["layer"] == layer])} for layer in layers],
        "per_step": per_step,
        "tensors": tensors,
    }


def public_json(summary: dict) -> dict:
    """The --json keys: the medians, the steps, the breakdowns (without per-tensor vectors of values)."""
    return {key: summary[key] for key in ("base_step", "steps", "n_tensors", *(f"median_{k}" for k in KEYS), "by_module", "by_layer", "per_step")}


def rank1_tensor(base: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """AlphaRL's rank-1 model of one 2-D weight: W_base + ||Delta||_F u1 v1^T, in current's dtype."""
    import torch

    dtype = torch.float64 if base.numel() <= FLOAT64_LIMIT else torch.float32
    delta = current.to(dtype) - base.to(dtype)
    sigma, u, v, _ = top_singular_triplet(delta)
    if sigma == 0:
        return current.clone()
    scale = float(torch.linalg.vector_norm(delta.double()))
    out = base.to(dtype) + scale * torch.outer(u.to(dtype), v.to(dtype))
    return out.to(current.dtype)


def write_rank1(
    base: Checkpoint, current: Checkpoint, out: str | os.PathLike, overwrite: bool = False, progress: Callable[[str, int, int], None] | None = None
) -> Path:
    """The AlphaRL rank-1 checkpoint of `current` against `base` at `out` (atomic, sharded like
    rlvrx.io.writer does; config and tokenizer from `current`): every 2-D weight rank-1, every other
    tensor as in `current`."""
    from rlvrx.io.atomic import check_replaceable, recover
    from rlvrx.io.writer import write_checkpoint

    out = Path(out)
    recover(out)
    for path in (base.path, current.path):
        if Path(path).resolve() == out.resolve() or out.resolve() in Path(path).resolve().parents:
            raise UsageError(f"--out {out} is (or holds) the input checkpoint {path}; choose another --out")
    if out.exists():
        if not overwrite:
            raise UsageError(f"{out} already exists; pass --overwrite to replace it")
        check_replaceable(out)
    infos = current.infos()
    matrices = set(matrix_weights(current))
    specs = [(name, info.shape, info.dtype_name) for name, info in infos.items()]

    def tensors():
        for i, name in enumerate(infos):
            yield name, rank1_tensor(base.get(name), current.get(name)) if name in matrices else current.get(name)
            if progress is not None:
                progress(name, i + 1, len(infos))

    return write_checkpoint(out, specs, tensors(), source_dir=current.path, overwrite=overwrite)  # type: ignore[arg-type]
