"""`rlvrx run RECIPE [KEY=VALUE...]`: the recipe's stages, in order, resumable."""

from __future__ import annotations

from typing import List, Optional

import typer
from rich.table import Table

from rlvrx.cli.args import LOGGER_HELP, logger_override
from rlvrx.cli.common import console, err_console
from rlvrx.cli.recipe import OVERRIDES_ARG, RECIPE_ARG


def run(
    recipe: str = RECIPE_ARG,
    overrides: Optional[List[str]] = OVERRIDES_ARG,
    only: Optional[str] = typer.Option(None, "--only", help="Run just this stage (by name), even if it finished before."),
    start_from: Optional[str] = typer.Option(None, "--from", help="Start at this stage; earlier ones are not run."),
    logger: Optional[str] = typer.Option(None, "--logger", help=LOGGER_HELP + " Passed to the train and rl-extra stages."),
) -> None:
    """Run the whole workflow a recipe lists under `stages:` (train, linearity, extrapolate, rl-extra, eval).

    Each stage is an rlvrx command on the run directory (output.dir); finished stages are skipped on a
    rerun, a failed stage stops the run and keeps everything done so far. Then see `rlvrx report RUN`.
    """
    from rlvrx.cli.pipeline import run_pipeline

    results = run_pipeline(
        recipe,
        [*(overrides or []), *logger_override(logger)],
        only=only,
        start_from=start_from,
        echo=lambda line: err_console.print(f"[bold cyan]{line}[/]", highlight=False, markup=True, soft_wrap=True),
    )
    table = Table("stage", "kind", "status", title="rlvrx run")
    for r in results:
        table.add_row(r["name"], r["kind"], r["status"])
    console.print(table)
