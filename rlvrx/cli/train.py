"""`rlvrx train RECIPE [KEY=VALUE...]`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from rlvrx.cli.args import LOGGER_HELP, logger_override
from rlvrx.cli.common import console, write_json
from rlvrx.cli.recipe import OVERRIDES_ARG, RECIPE_ARG


def train(
    recipe: str = RECIPE_ARG,
    overrides: Optional[List[str]] = OVERRIDES_ARG,
    force: bool = typer.Option(False, "--force", help="Continue in a run dir that holds a different recipe."),
    dry_run: bool = typer.Option(False, "--dry-run", help="backend verl: print the command and write the data files, launch nothing."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar (logs and CI)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write a summary as JSON here."),
    logger: Optional[str] = typer.Option(None, "--logger", help=LOGGER_HELP),
) -> None:
    """Train with GRPO (after an optional SFT warm-up), saving a checkpoint trajectory.

    Rerunning the same command resumes from the last checkpoint and reaches the same final weights.
    """
    from rlvrx.config import load_recipe

    resolved = load_recipe(recipe, [*(overrides or []), *logger_override(logger)])
    if resolved.backend == "verl":
        from rlvrx.backends.verl.launch import launch

        raise typer.Exit(launch(resolved, Path(resolved.output.dir), dry_run=dry_run))
    if dry_run:
        from rlvrx.errors import UsageError

        raise UsageError("--dry-run applies to backend: verl; the native backend has no separate launch step")
    from rlvrx.cli.progress import TrainProgress
    from rlvrx.train.trainer import train as run_training

    with TrainProgress(enabled=not no_progress) as progress:  # a RecipeMismatch reads "pass --force" (main words it)
        summary = run_training(resolved, force=force, progress=progress)
    table = Table("", "value", title=f"GRPO run {summary['run_dir']}")
    for key, label in (
        ("resumed_from", "resumed from step"),
        ("steps", "GRPO steps"),
        ("checkpoints", "checkpoints in trajectory"),
        ("test_accuracy_start", "greedy test accuracy, step 0"),
        ("test_accuracy_end", "greedy test accuracy, last step"),
        ("reward_first", "reward, first step"),
        ("reward_last", "reward, mean of last 5 steps"),
        ("wall_time_s", "wall time (s)"),
    ):
        value = summary.get(key)
        table.add_row(label, "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value)))
    console.print(table)
    write_json(json_path, summary)
