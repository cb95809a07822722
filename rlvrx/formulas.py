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
        raise UsageError(
            f"second_step ({second_step}) is before base_step ({base_step}); the second checkpoint must be the later one (swap them)"
        )
    return (target_step - base_step) / (second_step - base_step)


def resolve_alpha(
    base_step: int | None, second_step: int | None, target_step: int | None, alpha: float | None
) -> tuple[float, int | None]:
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
