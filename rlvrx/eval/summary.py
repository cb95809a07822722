"""Summaries of evaluation runs: pass@k / avg / maj@k per model and task (rlvrx.verify.metrics), the
samples graded wrong because grading failed, and reading back a result file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from rlvrx.errors import UsageError
from rlvrx.verify.records import default_k_list, failure_counts, record_outcome

if TYPE_CHECKING:
    from rlvrx.eval.runner import TaskRun

__all__ = ["failed_samples", "load_results", "summarize_runs"]


def summarize_runs(runs: Sequence[TaskRun], k_list: Sequence[int] | None = None) -> dict:
    """{model: {task: {"problems", "n", "avg", "avg_stderr", "pass@k"..., "maj@k"..., "timeouts", "errors"},
    "overall": {...} when the model has more than one task}} (metrics as fractions)."""
    from rlvrx.verify.metrics import summarize_tasks

    by_model: dict[str, dict[str, list]] = {}
    for run in runs:
        by_model.setdefault(run.model, {})[run.task] = [record_outcome(r) for r in run.records]
    summary = {}
    for model, by_task in by_model.items():
        ks = k_list
        if ks is None:
            ks = sorted({k for outcomes in by_task.values() for k in default_k_list(min(o.n for o in outcomes))})
        summary[model] = summarize_tasks(by_task, ks)
        totals = {"timeouts": 0, "errors": 0}
        for run in runs:
            if run.model == model:
                counts = failure_counts(run.records)
                summary[model][run.task].update(counts)
                for key in totals:
                    totals[key] += counts[key]
        if "overall" in summary[model]:
            summary[model]["overall"].update(totals)
    return summary


def load_results(path: str | os.PathLike) -> list[dict]:
    """The graded records of an eval result file (a last line cut short by a kill is left out)."""
    from rlvrx.generation.generations import check_graded, read_jsonl_records

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such result file")
    records, _ = read_jsonl_records(path, allow_partial_last=True)
    return [check_graded(r, f"{path} record {i}") for i, r in enumerate(records, 1)]


def failed_samples(runs: Sequence[TaskRun], limit: int = 5) -> list[str]:
    """A few lines naming samples graded wrong because grading timed out or failed, and why."""
    lines: list[str] = []
    for run in runs:
        for record in run.records:
            for j, status in enumerate(record["status"]):
                if status != "ok" and len(lines) < limit:
                    lines.append(f"{run.model} / {run.task} / {record['id']} sample {j}: {status} ({record['error'][j]})")
    return lines
