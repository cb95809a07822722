"""The jump arithmetic, once: every two-point jump (`rlvrx extrapolate weights`, RL-Extra's native
jump, the jump on verl's live FSDP2 shards) computes W_a + f (W_b - W_a) this way, so the same
inputs give the same bits whichever command made them.

The rounding is torch.lerp's in float32 (float64 inputs stay float64), cast back to W_b's dtype:
what the extrapolation kernel reproduces bit for bit. (torch.lerp evaluates the form that is exact
at its nearer end: start + f (end - start) for f < 0.5, end - (1 - f) (end - start) otherwise.)
"""

from __future__ import annotations

import torch


def jump(anchor: torch.Tensor, current: torch.Tensor, factor: float) -> torch.Tensor:
    """anchor + factor * (current - anchor) in current's dtype and device (see the module docstring)."""
    compute = torch.float64 if current.dtype == torch.float64 else torch.float32
    start = anchor.to(device=current.device, dtype=compute)
    return torch.lerp(start, current.to(compute), float(factor)).to(current.dtype)
