"""`rlvrx report RUN [--html PATH]`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rlvrx.cli.common import console


def report(
    run: Path = typer.Argument(..., help="Run directory."),
    html_path: Optional[Path] = typer.Option(None, "--html", help="Where to write the HTML page (default RUN/report/index.html)."),
) -> None:
    """Summarise a run: tables here, and one self-contained HTML page with every plot embedded.

    Training curves, R² histograms and the layer x module heatmap, a few parameters' trajectories with
    their fitted lines, extrapolation and eval tables, RL-Extra vs baseline, and the resolved recipe.
    PNGs are also saved next to the results (RUN/report/).
    """
    from rlvrx.render.html import print_summary, write_report

    data, out = write_report(run, html_path)
    print_summary(data, console)
    console.print(f"report: {out}", highlight=False)
