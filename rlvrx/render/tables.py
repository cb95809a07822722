"""Terminal presentation shared by commands: number formatting, rich tables, text histograms, progress
bars, and CSV files (written to a temporary sibling and renamed into place)."""

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

from rlvrx.io.atomic import atomic_file

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
