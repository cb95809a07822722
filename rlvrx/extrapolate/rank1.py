"""The first pass of `--fit rank1` (RELEX's temporal rank-1 extrapolation) for one tensor: the T x T
Gram matrix of its drifts M[t] = theta_t - theta_B, accumulated in float64 over chunks, and from it
(rlvrx.formulas.rank1_coefficients) the per-tensor weights w_t of the prediction
theta_B + sum_t w_t M[t] = theta_B + sum_r (a_r + b_r T) v_r. The second pass is the streamed
combination that least squares uses too (rlvrx.extrapolate.arithmetic.combine_into)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from rlvrx.errors import RlvrxError
from rlvrx.formulas import rank1_coefficients

if TYPE_CHECKING:
    import torch


def drift_gram(flats: Sequence[torch.Tensor], chunk_elements: int) -> torch.Tensor:
    """G[s, t] = <theta_s - theta_B, theta_t - theta_B> in float64; flats[0] is theta_B. Holds one
    (T, chunk / T) float64 block at a time."""
    import torch

    rows = len(flats) - 1
    gram = torch.zeros((rows, rows), dtype=torch.float64)
    numel = flats[0].numel()
    step = max(1, chunk_elements // max(1, rows))
    block = torch.empty((rows, min(step, numel)), dtype=torch.float64)
    for i in range(0, numel, step):
        j = min(numel, i + step)
        part = block[:, : j - i]
        base = flats[0][i:j].to(torch.float64)
        for t in range(rows):
            part[t].copy_(flats[t + 1][i:j])
            part[t].sub_(base)
        gram.addmm_(part, part.T)
    return gram


def rank1_weights(name: str, flats: Sequence[torch.Tensor], steps: Sequence[int], target_step: int, rank: int, chunk_elements: int) -> tuple[list[float], dict]:
    """(c_k for flats [theta_B, theta_1, ...] with sum c_k = 1, the tensor's provenance entry)."""
    base_step = steps[0]
    gram = drift_gram(flats, chunk_elements).numpy()
    if not np.isfinite(gram).all():
        raise RlvrxError(f"tensor {name}: its drifts hold inf/nan (or overflow float64); an input checkpoint is damaged there")
    w, stats = rank1_coefficients(gram, [s - base_step for s in steps[1:]], target_step - base_step, rank)
    coefficients = [1.0 - sum(w), *w]
    entry = {
        "explained_variance": [s["explained_variance"] for s in stats],
        "r2": [s["r2"] for s in stats],
        "sigma": [s["sigma"] for s in stats],
        "weights": w,
    }
    return coefficients, entry


def mapped_tensor(values) -> torch.Tensor:
    """A flat torch view of a checkpoint tensor's memory map (Checkpoint.raw): no copy, so the two
    passes over a window hold only chunks. Never written to."""
    import warnings

    import torch

    from rlvrx.io.dtypes import torch_dtypes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memory map: torch warns, nothing writes to it
        return torch.from_numpy(values.data).view(torch_dtypes()[values.dtype_name])
