"""Predict future models from earlier checkpoints: weight extrapolation (streaming) and logits
extrapolation (two models decoding in lockstep, see rlvrx.generation)."""

from rlvrx.extrapolate.arithmetic import combine_tensor, lerp_tensor
from rlvrx.extrapolate.options import PROVENANCE, Source, WeightsExtrapolation, WeightsOptions
from rlvrx.extrapolate.request import extrapolate_weights
from rlvrx.extrapolate.weights import extrapolate_lstsq, extrapolate_rank1, extrapolate_two_point
from rlvrx.formulas import DEFAULT_COPY_PATTERNS, interpolation_warning, is_copied, lstsq_coefficients, two_point_alpha

__all__ = [
    "DEFAULT_COPY_PATTERNS",
    "PROVENANCE",
    "Source",
    "WeightsExtrapolation",
    "WeightsOptions",
    "combine_tensor",
    "extrapolate_lstsq",
    "extrapolate_rank1",
    "extrapolate_two_point",
    "extrapolate_weights",
    "interpolation_warning",
    "is_copied",
    "lerp_tensor",
    "lstsq_coefficients",
    "two_point_alpha",
]
