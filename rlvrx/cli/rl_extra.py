"""`rlvrx rl-extra RECIPE [KEY=VALUE...] [--baseline]` and `rlvrx rl-extra compare RUN_A RUN_B`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from rlvrx.cli.args import LOGGER_HELP, logger_override
from rlvrx.cli.common import console, write_json
from rlvrx.errors import UsageError


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def rl_extra(
    args: List[str] = typer.Argument(
        ...,
        help="RECIPE [KEY=VALUE...] to train with RL-Extra, or `compare RUN_A RUN_B` to compare two runs.",
        show_default=False,
    ),
    baseline: bool = typer.Option(
        False, "--baseline", help="Also run plain GRPO with the same seed and gradient-step budget (in OUTPUT-baseline), then compare."
    ),
    force: bool = typer.Option(False, "--force", help="Continue in a run dir that holds a different recipe."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    png: Optional[Path] = typer.Option(None, "--png", help="compare: where to write the plot (default RUN_A/compare.png)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write a summary as JSON here."),
    logger: Optional[str] = typer.Option(None, "--logger", help=LOGGER_HELP),
) -> None:
    """RL-Extra: m GRPO steps, then jump n steps ahead along the weight drift; repeat `iterations` times.

    The recipe's rl_extra section sets m, n, iterations, anchor (cycle_start|window), fit (two_point|lstsq),
    optimizer_state (keep|reset|rescale) and norms (copy|extrapolate). Rerunning resumes, across jumps too.
    """
    if args[0] == "compare":
        if len(args) != 3:
            raise UsageError("usage: rlvrx rl-extra compare RUN_A RUN_B")
        _compare(Path(args[1]), Path(args[2]), png, json_path)
        return
    from rlvrx.config import load_recipe
    from rlvrx.train.rl_extra import baseline_recipe, train_rl_extra
    from rlvrx.train.trainer import train

    recipe = load_recipe(args[0], [*args[1:], *logger_override(logger)])
    if recipe.backend == "verl":
        from rlvrx.backends.verl.launch import launch

        raise typer.Exit(launch(recipe, Path(recipe.output.dir), dry_run=False))
    summary = _with_progress(train_rl_extra, recipe, force, no_progress)
    table = Table("", "RL-Extra", title=f"RL-Extra run {summary['run_dir']}")
    rows = {"RL-Extra": summary}
    if baseline:
        rows["GRPO baseline"] = _with_progress(train, baseline_recipe(recipe), force, no_progress)
        table.add_column("GRPO baseline")
    for key, label in (
        ("grad_steps", "gradient steps taken"),
        ("steps", "effective steps"),
        ("train_time_s", "training wall time (s)"),
        ("reward_last", "reward, mean of last 5 steps"),
        ("test_accuracy_start", "greedy test accuracy, start"),
        ("test_accuracy_end", "greedy test accuracy, end"),
    ):
        table.add_row(label, *(_fmt(r.get(key)) for r in rows.values()))
    console.print(table)
    write_json(json_path, rows)
    if baseline:
        _compare(Path(summary["run_dir"]), Path(rows["GRPO baseline"]["run_dir"]), png, None)


def _with_progress(run, recipe, force: bool, no_progress: bool) -> dict:
    """run(recipe) under a progress bar; a run dir holding another recipe is refused naming --force (main words it)."""
    from rlvrx.cli.progress import TrainProgress

    with TrainProgress(enabled=not no_progress) as progress:
        return run(recipe, force=force, progress=progress)


def _compare(run_a: Path, run_b: Path, png: Optional[Path], json_path: Optional[Path]) -> None:
    from rlvrx.render.plots import save_comparison_png
    from rlvrx.rundir import RunDir
    from rlvrx.train.compare import compare_runs

    result = compare_runs(run_a, run_b)
    by_step = Table("gradient steps", f"{run_a.name}", f"{run_b.name}", title="greedy test accuracy at equal gradient steps")
    for row in result["by_grad_step"]:
        by_step.add_row(str(row["grad_step"]), _fmt(row["a"]), _fmt(row["b"]))
    by_time = Table("wall time (s)", f"{run_a.name}", f"{run_b.name}", title="greedy test accuracy at equal training wall time")
    for row in result["by_wall_time"]:
        by_time.add_row(f"{row['elapsed']:.1f}", _fmt(row["a"]), _fmt(row["b"]))
    console.print(by_step)
    console.print(by_time)
    out = save_comparison_png(result, png or RunDir(run_a).compare_png, labels=(run_a.name, run_b.name))
    console.print(f"plot: {out}", highlight=False)
    write_json(json_path, {k: v for k, v in result.items() if k != "curves"})
