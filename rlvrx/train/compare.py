"""Compare two training runs (e.g. RL-Extra vs plain GRPO): accuracy against gradient steps and wall time.

The data only; rlvrx.render.plots.save_comparison_png draws it."""

from __future__ import annotations

from pathlib import Path

from rlvrx.errors import UsageError
from rlvrx.rundir import RunDir


def eval_curve(run_dir: str | Path) -> list[dict]:
    """The run's test-accuracy points: [{grad_step, step, elapsed, test_accuracy, stage}] in log order."""
    run = RunDir(run_dir)
    path = run.metrics
    if not path.is_file():
        raise UsageError(f"{path}: no metrics; is {run_dir} a training run directory?")
    points = []
    for record in run.read_metrics():
        if "test_accuracy" in record:
            points.append({k: record.get(k) for k in ("grad_step", "step", "elapsed", "test_accuracy", "stage")})
    if not points:
        raise UsageError(f"{path}: no test_accuracy records (set grpo.eval_every)")
    return points


def accuracy_at(points: list[dict], key: str, value: float) -> float | None:
    """Accuracy of the last point with points[key] <= value (what the run had reached by then)."""
    reached = [p for p in points if p[key] is not None and p[key] <= value + 1e-9]
    return reached[-1]["test_accuracy"] if reached else None


def compare_runs(run_a: str | Path, run_b: str | Path) -> dict:
    a, b = eval_curve(run_a), eval_curve(run_b)
    grad_points = sorted({p["grad_step"] for p in a + b})
    budget = min(max(p["elapsed"] or 0 for p in a), max(p["elapsed"] or 0 for p in b))
    time_points = [budget * i / 4 for i in range(1, 5)]
    return {
        "runs": [str(run_a), str(run_b)],
        "by_grad_step": [{"grad_step": g, "a": accuracy_at(a, "grad_step", g), "b": accuracy_at(b, "grad_step", g)} for g in grad_points],
        "by_wall_time": [{"elapsed": t, "a": accuracy_at(a, "elapsed", t), "b": accuracy_at(b, "elapsed", t)} for t in time_points],
        "final": {
            "a": {"grad_step": a[-1]["grad_step"], "step": a[-1]["step"], "elapsed": a[-1]["elapsed"], "test_accuracy": a[-1]["test_accuracy"]},
            "b": {"grad_step": b[-1]["grad_step"], "step": b[-1]["step"], "elapsed": b[-1]["elapsed"], "test_accuracy": b[-1]["test_accuracy"]},
        },
        "curves": {"a": a, "b": b},
    }
