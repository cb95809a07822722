"""The predictor shoot-out's table (rlvrx.cli.shootout)."""

from __future__ import annotations

from rlvrx.render.tables import fmt, pct, table


def shootout_table(result: dict):
    """One row per predictor (and, with eval, the real checkpoint and the window end)."""
    acc = result.get("accuracy") or {}
    columns = ["predictor", "weight error / drift", "||pred - real||"]
    if acc:
        columns.append(f"{result['task']} avg")

    def accuracy(name: str) -> str:
        m = acc.get(name)
        return "-" if m is None or m["avg"] is None else pct(m["avg"]) + (f" ± {pct(m['avg_stderr'])}" if m.get("avg_stderr") is not None else "")

    rows = []
    for name, row in result["predictors"].items():
        rows.append([name, fmt(row["relative"], 4), fmt(row["error"], 4), *([accuracy(name)] if acc else [])])
    end_drift = next(iter(result["predictors"].values()))["drift"]
    rows.append(["window end (no change)", fmt(1.0 if end_drift > 0 else None, 4), fmt(end_drift, 4), *([accuracy("window-end")] if acc else [])])
    if acc:
        rows.append(["real checkpoint", fmt(0.0, 4), fmt(0.0, 4), accuracy("real")])
    steps = result["window_steps"]
    title = f"predicting step {result['target']} from window {steps[0]}..{steps[-1]} ({len(steps)} checkpoints, alpha {result['alpha']:g})"
    return table(title, columns, rows)
