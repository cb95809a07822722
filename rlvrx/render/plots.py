"""PNG plots, one convention: a matplotlib `Figure` on a `FigureCanvasAgg` (no pyplot global state, no
`matplotlib.use()`, no display needed), saved atomically through `save`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from rlvrx.io.atomic import atomic_file


def figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global backend), laid out by constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG atomically (a temporary sibling renamed into place), creating the parent dir."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def save_histogram_png(
    path: str | os.PathLike,
    counts: Sequence[int],
    lo: float = 0.0,
    hi: float = 1.0,
    bins: int = 100,
    title: str = "",
    xlabel: str = "R²",
    ylabel: str = "fraction",
    markers: Sequence[float] = (0.7, 0.9),
    median: float | None = None,
) -> Path:
    """Histogram of pre-binned counts over [lo, hi] (rebinned to `bins` when that divides them), as fractions."""
    counts = np.asarray(counts, dtype=np.float64)
    if len(counts) % bins == 0 and len(counts) != bins:
        counts = counts.reshape(bins, -1).sum(axis=1)
    total = counts.sum()
    heights = counts / total if total else counts
    edges = np.linspace(lo, hi, len(counts) + 1)
    fig = figure(6.4, 4.0)
    ax = fig.add_subplot()
    ax.bar(edges[:-1], heights, width=np.diff(edges), align="edge", color="#4C72B0", edgecolor="none")
    for x in markers:
        ax.axvline(x, color="#999999", linestyle=":", linewidth=1)
    if median is not None:
        ax.axvline(median, color="#C44E52", linewidth=1.5, label=f"median {median:.3f}")
        ax.legend(loc="upper left", frameon=False)
    ax.set_xlim(lo, hi)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return save(fig, path)


def save_heatmap_png(
    path: str | os.PathLike,
    matrix: np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
    colorbar_label: str = "",
    vmin: float = 0.0,
    vmax: float = 1.0,
    annotate: bool | None = None,
    xlabel: str = "",
    ylabel: str = "",
) -> Path:
    """Rows x columns heatmap; NaN cells stay blank. Annotated with values when small enough to read."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows, cols = matrix.shape
    if annotate is None:
        annotate = rows * cols <= 400
    fig = figure(max(4.0, 0.7 * cols + 2.5), max(3.0, 0.32 * rows + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(matrix), aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(cols), labels=list(col_labels))
    ax.set_yticks(range(rows), labels=list(row_labels))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if annotate:
        for r in range(rows):
            for c in range(cols):
                value = matrix[r, c]
                if np.isfinite(value):
                    shade = (value - vmin) / (vmax - vmin) if vmax > vmin else 0.5
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="black" if shade > 0.6 else "white")
    fig.colorbar(image, ax=ax, label=colorbar_label)
    return save(fig, path)


def save_lines_png(
    path: str | os.PathLike,
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    max_legend: int = 10,
) -> Path:
    """One line per series against x (legend only when there are few series)."""
    fig = figure(6.4, 4.0)
    ax = fig.add_subplot()
    for label, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", markersize=3, linewidth=1, label=label)
    if 0 < len(series) <= max_legend:
        ax.legend(frameon=False, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return save(fig, path)


def save_training_png(metrics: list[dict], path: str | os.PathLike) -> Path | None:
    """Reward of the GRPO rollouts and greedy test accuracy against the (effective) step, with RL-Extra
    jumps marked; None when the metrics hold neither."""
    metrics = [m for m in metrics if m.get("step") is not None]
    steps = [m for m in metrics if m.get("stage") == "grpo" and m.get("reward_mean") is not None]
    evals = [m for m in metrics if m.get("test_accuracy") is not None]
    if not steps and not evals:
        return None
    fig = figure(7, 3.6)
    ax = fig.add_subplot()
    if steps:
        ax.plot([m["step"] for m in steps], [m["reward_mean"] for m in steps], lw=1, alpha=0.7, label="reward (train rollouts)")
    if evals:
        ax.plot([m["step"] for m in evals], [m["test_accuracy"] for m in evals], "o-", ms=4, label="greedy test accuracy")
    jumps = [m["step"] for m in metrics if m.get("stage") == "jump"]
    for j, step in enumerate(jumps):
        ax.axvline(step, color="grey", lw=0.6, ls=":", label="RL-Extra jump" if j == 0 else None)
    ax.set_xlabel("step (effective)")
    ax.set_ylabel("reward / accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, path)


def save_line_fits_png(path: str | os.PathLike, x: np.ndarray, series: Sequence[tuple[str, np.ndarray]], cols: int = 3) -> Path:
    """One small panel per (label, y) series: the points against x, their least-squares line and its R²."""
    rows_n = int(np.ceil(len(series) / cols))
    fig = figure(10, 2.8 * rows_n)
    axes = fig.subplots(rows_n, cols, squeeze=False)
    for ax, (label, y) in zip(axes.flat, series):
        slope, intercept = np.polyfit(x, y, 1)
        r2 = float(np.corrcoef(x, y)[0, 1] ** 2) if np.std(y) > 0 else float("nan")
        ax.plot(x, y, "o", ms=3)
        ax.plot(x, intercept + slope * x, "-", lw=1)
        ax.set_title(f"{label}\nR² = {r2:.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(series) :]:
        ax.axis("off")
    return save(fig, path)


def save_comparison_png(result: dict, path: str | os.PathLike, labels: tuple[str, str] = ("A", "B")) -> Path:
    """Two runs' greedy test accuracy against gradient steps and against training wall time
    (`result` from rlvrx.train.compare.compare_runs)."""
    fig = figure(10, 4)
    axes = fig.subplots(1, 2)
    for key, label in zip(("a", "b"), labels):
        curve = result["curves"][key]
        axes[0].plot([p["grad_step"] for p in curve], [p["test_accuracy"] for p in curve], marker="o", ms=3, label=label)
        axes[1].plot([p["elapsed"] or 0 for p in curve], [p["test_accuracy"] for p in curve], marker="o", ms=3, label=label)
    axes[0].set_xlabel("gradient steps")
    axes[1].set_xlabel("training wall time (s)")
    for ax in axes:
        ax.set_ylabel("greedy test accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)
