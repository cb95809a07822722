"""A training run's metrics.jsonl: one JSON object per line, appended as training goes.

The one reader of it (trainer resume and summary, `rl-extra compare`, `rlvrx report`). A process
killed mid-append leaves a torn last line; it is dropped (the step is recomputed on resume), while
damage anywhere else is a one-line error naming the file and line.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlvrx.errors import UsageError
from rlvrx.jsonio import iter_jsonl

METRICS = "metrics.jsonl"
# Fields the readers compute with: when present they must be numbers (test_accuracy may be NaN/null).
NUMERIC = ("step", "grad_step", "elapsed", "test_accuracy", "reward_mean", "accuracy", "loss", "kl", "entropy", "grad_norm", "lr")


def metrics_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / METRICS


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The run's metric records in log order ([] when it has no metrics.jsonl)."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return []
    records = []
    for line, record in iter_jsonl(path, torn_tail="drop"):
        for key in NUMERIC:
            value = record.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise UsageError(f"{path}:{line}: {key} must be a number, found {value!r}")
        if not isinstance(record.get("step", 0), int):
            raise UsageError(f"{path}:{line}: step must be an integer, found {record['step']!r}")
        records.append(record)
    return records
