"""How linearly a trajectory moves: per-parameter weight R² (streamed) and per-token log-prob R²."""

from rlvrx.linearity.logprobs import Probe, analyze_logprobs, generate_probes, load_probes, score_checkpoints
from rlvrx.linearity.stats import FINE_BINS, histogram_median, r2_columns, summarize_values
from rlvrx.linearity.weights import (
    WeightSettings,
    WeightState,
    analyze_weights,
    merge_states,
    plan_shards,
    sample_indices,
    summarize,
)

__all__ = [
    "FINE_BINS",
    "Probe",
    "WeightSettings",
    "WeightState",
    "analyze_logprobs",
    "analyze_weights",
    "generate_probes",
    "histogram_median",
    "load_probes",
    "merge_states",
    "plan_shards",
    "r2_columns",
    "sample_indices",
    "score_checkpoints",
    "summarize",
    "summarize_values",
]
