"""Presentation helpers shared by commands: rich tables, terminal histograms, PNG plots, CSV files.

Plots use matplotlib's Agg canvas through `matplotlib.figure.Figure` (no pyplot global state, no
display needed). Every file is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rlvrx.checkpoint import atomic_file

BAR_BLOCKS = " ▏▎▍▌▋▊▉█"


def fmt(value: float | int | None, digits: int = 3) -> str:
    """Numbers for tables: '-' for None/NaN, ints with thousands separators, floats to `digits`."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{int(value):,}"
    return f"{float(value):.{digits}f}"


def pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}%"


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[object]], numeric_from: int = 1) -> Table:
    """A rich table; columns from index `numeric_from` on are right-aligned. Cells are str()-ed."""
    out = Table(title=title, title_justify="left", header_style="bold")
    for i, column in enumerate(columns):
        out.add_column(column, justify="right" if i >= numeric_from else "left", no_wrap=i < numeric_from)
    for row in rows:
        out.add_row(*[cell if isinstance(cell, str) else fmt(cell) for cell in row])
    return out


def text_histogram(counts: Sequence[int], lo: float = 0.0, hi: float = 1.0, bins: int = 20, width: int = 40) -> str:
    """Horizontal bar histogram for the terminal; `counts` is rebinned to `bins` (which must divide it)."""
    counts = np.asarray(counts, dtype=np.int64)
    if len(counts) % bins == 0:
        counts = counts.reshape(bins, -1).sum(axis=1)
    bins = len(counts)
    peak = int(counts.max()) if counts.size else 0
    total = int(counts.sum())
    edges = np.linspace(lo, hi, bins + 1)
    lines = []
    for b in range(bins):
        frac = counts[b] / peak if peak else 0.0
        eighths = int(round(frac * width * 8))
        bar = "█" * (eighths // 8) + (BAR_BLOCKS[eighths % 8] if eighths % 8 else "")
        share = counts[b] / total if total else 0.0
        lines.append(f"{edges[b]:5.2f}-{edges[b + 1]:4.2f} │{bar:<{width}}│ {share:6.1%}")
    return "\n".join(lines)


def progress_bar(console=None, transient: bool = False, count: bool = True) -> Progress:
    """A progress bar: description, bar, [done/total,] percentage, elapsed and remaining time."""
    return Progress(
        TextColumn("{task.description}", table_column=None),
        BarColumn(),
        *([MofNCompleteColumn()] if count else []),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


# ----------------------------------------------------------------------------------------------
# Files


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[object]]) -> Path:
    """Atomic CSV; None becomes an empty cell, floats keep full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if cell is None else (repr(cell) if isinstance(cell, float) else cell) for cell in row])
    with atomic_file(path) as tmp:
        tmp.write_text(buffer.getvalue())
    return Path(path)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
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
    fig = _figure(6.4, 4.0)
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
    return _save(fig, path)


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
    fig = _figure(max(4.0, 0.7 * cols + 2.5), max(3.0, 0.32 * rows + 1.8))
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
    return _save(fig, path)


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
    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    for label, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", markersize=3, linewidth=1, label=label)
    if 0 < len(series) <= max_legend:
        ax.legend(frameon=False, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _save(fig, path)
