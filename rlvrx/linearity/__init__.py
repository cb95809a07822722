"""How linearly a trajectory moves: per-parameter weight R² (streamed) and per-token log-prob R².

Names are imported on first use: weight linearity runs without torch, log-prob linearity needs it.
"""

import importlib

_EXPORTS = {
    "FINE_BINS": "stats",
    "histogram_median": "stats",
    "r2_columns": "stats",
    "summarize_values": "stats",
    "Probe": "logprobs",
    "analyze_logprobs": "logprobs",
    "generate_probes": "logprobs",
    "load_probes": "logprobs",
    "score_checkpoints": "logprobs",
    "WeightSettings": "weights",
    "WeightState": "state",
    "analyze_weights": "weights",
    "merge_states": "state",
    "partition_tensors": "plan",
    "sample_indices": "plan",
    "summarize": "summary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
