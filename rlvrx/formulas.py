"""The arithmetic of extrapolation, once: the two-point jump, its alpha, the least-squares weights, and
which tensors are copied instead of extrapolated.

Every two-point jump (`rlvrx extrapolate weights`' torch path, RL-Extra's native jump, the jump on
verl's live FSDP2 shards) computes W_a + f (W_b - W_a) through `jump`, so the same inputs give the
same bits whichever command made them. The rounding is torch.lerp's in float32 (float64 inputs stay
float64), cast back to W_b's dtype: what the extrapolation kernel (rlvrx.kernels) reproduces bit for
bit. (torch.lerp evaluates the form that is exact at its nearer end: start + f (end - start) for
f < 0.5, end - (1 - f) (end - start) otherwise.)

torch is imported only by `jump`, so the rest serves the torch-free kernel path too.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Sequence

from rlvrx.errors import UsageError
from rlvrx.io.dtypes import FLOAT_DTYPES

if TYPE_CHECKING:
    import torch

# Name substrings of the tensors taken verbatim from the latest checkpoint (norm weights).
DEFAULT_COPY_PATTERNS = ("norm", "layernorm", "rmsnorm", "ln_")


def jump(
    anchor: torch.Tensor,
    current: torch.Tensor,
    factor: float,
    *,
    compute: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """anchor + factor * (current - anchor), torch.lerp's rounding in `compute` (default: float32, or
    float64 for float64 inputs; see the module docstring).

    Without `out`: the result in current's dtype and device. With `out` (1-D like the inputs, on
    their device): the result written into it, cast to its dtype."""
    import torch

    if compute is None:
        compute = torch.float64 if current.dtype == torch.float64 else torch.float32
    if out is None:
        start = anchor.to(device=current.device, dtype=compute)
        return torch.lerp(start, current.to(compute), float(factor)).to(current.dtype)
    # torch.lerp computes bf16/fp16 in float32 internally: the same bits in one pass, without copies
    fused = anchor.dtype == current.dtype == out.dtype and (
        anchor.dtype == compute or (compute == torch.float32 and anchor.dtype in (torch.bfloat16, torch.float16))
    )
    if fused:
        return torch.lerp(anchor, current, float(factor), out=out)
    return out.copy_(torch.lerp(anchor.to(compute), current.to(compute), float(factor)))


def two_point_alpha(base_step: int, second_step: int, target_step: float) -> float:
    """alpha = (T - S0) / (S1 - S0)."""
    if second_step == base_step:
        raise UsageError(f"base_step and second_step are both step {base_step}; extrapolation needs two different steps")
    if second_step < base_step:
        raise UsageError(f"second_step ({second_step}) is before base_step ({base_step}); the second checkpoint must be the later one (swap them)")
    return (target_step - base_step) / (second_step - base_step)


def resolve_alpha(base_step: int | None, second_step: int | None, target_step: int | None, alpha: float | None) -> tuple[float, int | None]:
    """(alpha, target_step) from target_step or alpha: alpha = (T - S0) / (S1 - S0); T is derived
    from alpha when integral. Without both steps, alpha is needed."""
    if alpha is not None and not math.isfinite(alpha):
        raise UsageError(f"alpha={alpha}: must be a finite number")
    if base_step is not None and second_step is not None:
        if target_step is not None and alpha is not None:
            raise UsageError("give target_step or alpha, not both (alpha = (target_step - base_step) / (second_step - base_step))")
        if target_step is not None:
            return two_point_alpha(base_step, second_step, target_step), target_step
        if alpha is None:
            raise UsageError("give target_step (alpha = (target_step - base_step) / (second_step - base_step)) or alpha")
        two_point_alpha(base_step, second_step, base_step)  # validates the steps
        value = base_step + alpha * (second_step - base_step)
        return alpha, int(round(value)) if abs(value - round(value)) < 1e-9 else None
    if alpha is None:
        raise UsageError("alpha is needed without base_step and second_step")
    return alpha, target_step


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


def gram_top_components(gram, rank: int, steps: Sequence[float] | None = None):
    """The top `rank` left singular pairs of M from its T x T Gram matrix G = M M^T (float64):
    (sigmas, U) with sigma_r = sqrt(lambda_r) and U[:, r] the unit eigenvector, largest first.
    Components whose eigenvalue is not above rounding level (an unchanged tensor) get sigma 0.
    The sign is fixed so that the coefficients c_t = sigma u[t] grow along the rows (or, without
    `steps`, so that the largest |u[t]| is positive): only sigma u v^T is defined, this makes the
    reported lines reproducible."""
    import numpy as np

    g = np.asarray(gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise UsageError(f"gram must be a square matrix, got shape {g.shape}")
    if not 1 <= rank <= g.shape[0]:
        raise UsageError(f"rank must be between 1 and the number of rows ({g.shape[0]}), got {rank}")
    values, vectors = np.linalg.eigh((g + g.T) / 2)
    order = np.argsort(values)[::-1][:rank]
    values, vectors = values[order], vectors[:, order]
    floor = max(float(np.trace(g)), 0.0) * g.shape[0] * 1e-15
    sigmas = np.sqrt(np.where(values > floor, values, 0.0))
    for r in range(rank):
        u = vectors[:, r]
        key = (np.asarray(steps, dtype=np.float64) - np.mean(steps)) @ u if steps is not None and len(steps) > 1 else 0.0
        if key == 0.0:
            key = u[np.argmax(np.abs(u))]
        if key < 0:
            vectors[:, r] = -u
    return sigmas, vectors


def ols_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """(a, b, R^2) of the least-squares line y = a + b x. R^2 = 1 - SS_res / SS_tot; a flat exact
    fit (SS_tot = 0) has R^2 1.0. Needs two distinct x."""
    if len(xs) != len(ys):
        raise UsageError(f"xs and ys differ in length ({len(xs)} vs {len(ys)})")
    if len(set(xs)) < 2:
        raise UsageError(f"a line needs at least 2 distinct x values, got {list(xs)}")
    n = len(xs)
    mx, my = math.fsum(xs) / n, math.fsum(ys) / n
    sxx = math.fsum((x - mx) ** 2 for x in xs)
    b = math.fsum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_tot = math.fsum((y - my) ** 2 for y in ys)
    ss_res = math.fsum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    if ss_tot == 0:
        return a, b, 1.0 if ss_res == 0 else float("nan")
    return a, b, 1.0 - ss_res / ss_tot


def rank1_coefficients(gram, steps: Sequence[float], target_step: float, rank: int = 1) -> tuple[list[float], list[dict]]:
    """The temporal rank-r extrapolation as weights of the rows of M (M[t] = theta_t - theta_B, one
    row per step): theta_B + sum_r (a_r + b_r T) v_r = theta_B + sum_t w_t M[t], since
    v_r = M^T u_r / sigma_r. Each component's coefficients c_t = sigma_r u_r[t] get an OLS line on
    `steps`; one row (a single checkpoint) is the line through (base, 0), i.e. given as steps
    relative to the base it is two-point extrapolation. Returns (w, per-component stats:
    sigma, explained_variance sigma_r^2 / sum sigma_i^2, r2 of the line, a, b)."""
    import numpy as np

    g = np.asarray(gram, dtype=np.float64)
    if len(steps) != g.shape[0]:
        raise UsageError(f"steps has {len(steps)} entries for a {g.shape[0]} x {g.shape[0]} gram matrix")
    sigmas, vectors = gram_top_components(g, rank, steps)
    total = float(np.trace(g))
    weights = np.zeros(g.shape[0])
    stats = []
    for r in range(rank):
        sigma, u = float(sigmas[r]), vectors[:, r]
        if sigma == 0.0:
            stats.append({"sigma": 0.0, "explained_variance": None, "r2": None, "a": 0.0, "b": 0.0})
            continue
        c = [sigma * float(x) for x in u]
        if len(steps) == 1:
            a, b, r2 = 0.0, c[0] / steps[0], 1.0
        else:
            a, b, r2 = ols_line(list(steps), c)
        weights += (a + b * target_step) / sigma * u
        stats.append({"sigma": sigma, "explained_variance": sigma**2 / total, "r2": r2, "a": a, "b": b})
    return [float(w) for w in weights], stats
