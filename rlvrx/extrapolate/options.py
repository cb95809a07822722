"""What `rlvrx extrapolate weights` takes and gives: its inputs, options, and the result with its provenance."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from rlvrx import __version__
from rlvrx.formulas import DEFAULT_COPY_PATTERNS

if TYPE_CHECKING:
    import torch

PROVENANCE = "extrapolation.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
METHODS = ("two-point", "lstsq", "rank1")

FORMULAS = {
    "two-point": "W = W_base + alpha * (W_second - W_base)",
    "lstsq": "W = sum_k c_k W_k (per-parameter least-squares line through the inputs, evaluated at target_step)",
    "rank1": (
        "per tensor, M[t] = W_t - W_base for the window's checkpoints; top-r singular pairs of M (Gram matrix in float64), "
        "c_t = sigma_r u_r[t], OLS line c_t = a_r + b_r (t - base) on the steps; W = W_base + sum_r (a_r + b_r (T - base)) v_r "
        "= W_base + sum_t weights[t] M[t] (tensors[name].weights); one window checkpoint: the line through (base, 0)"
    ),
}

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
    rank: int | None = None  # rank1: the number of components
    tensor_fits: dict[str, dict] = field(default_factory=dict)  # rank1: each tensor's explained variance, R^2, weights

    def medians(self) -> dict:
        """rank1: the median over tensors of the top component's explained variance and R^2 (None
        without fitted tensors, or for tensors that did not move)."""
        import statistics

        out: dict = {}
        for key in ("explained_variance", "r2"):
            values = [fit[key][0] for fit in self.tensor_fits.values() if fit[key][0] is not None]
            out[f"median_{key}"] = statistics.median(values) if values else None
        return out

    def provenance(self) -> dict:
        extra = {"rank": self.rank, **self.medians(), "tensors": self.tensor_fits} if self.method == "rank1" else {}
        return {
            "rlvrx_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "method": self.method,
            "formula": FORMULAS[self.method],
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
            **extra,
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
            **({"rank": self.rank, **self.medians()} if self.method == "rank1" else {}),
        }
