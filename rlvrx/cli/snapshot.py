"""`rlvrx snapshot scan|add|list|verify`: a run's trajectory manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from rlvrx.cli.common import console, err_console, write_json
from rlvrx.trajectory import Trajectory

app = typer.Typer(no_args_is_help=True)

RUN_OPT = typer.Option(..., "--run", help="Run directory that holds (or will hold) trajectory.json.")
NO_HASH = typer.Option(False, "--no-hash", help="Skip sha256 of the weight files (faster for big models).")


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def scan(
    directory: Path = typer.Argument(..., help="Directory holding step_N, global_step_N (verl) or checkpoint-N dirs."),
    run: Path = RUN_OPT,
    base: Optional[Path] = typer.Option(None, help="Register this model as the starting point (step 0, kind base)."),
    no_hash: bool = NO_HASH,
    replace: bool = typer.Option(False, help="Re-register steps that are already in the manifest."),
) -> None:
    """Discover checkpoints under DIRECTORY and register them in RUN/trajectory.json."""
    traj = Trajectory.load(run, create=True)
    added = []
    if base is not None:
        added.append(traj.add(0, base, kind="base", hash=not no_hash, replace=replace))
    added += traj.scan(directory, hash=not no_hash, replace=replace)
    if not traj.entries:
        err_console.print(f"[yellow]no checkpoints found under {directory}[/]")
        raise typer.Exit(1)
    traj.save()
    console.print(f"registered {len(added)} checkpoint(s); {traj.manifest} now holds steps {traj.steps}", highlight=False)


@app.command()
def add(
    run: Path = typer.Argument(..., help="Run directory."),
    path: Path = typer.Argument(..., help="Checkpoint directory to register."),
    step: int = typer.Option(..., "--step", help="Training step of this checkpoint."),
    kind: str = typer.Option("rl", help="base, rl or extrapolated."),
    no_hash: bool = NO_HASH,
    replace: bool = typer.Option(False, help="Replace an existing entry at this step."),
) -> None:
    """Register one checkpoint at a step."""
    traj = Trajectory.load(run, create=True)
    entry = traj.add(step, path, kind=kind, hash=not no_hash, replace=replace)
    traj.save()
    console.print(f"step {entry.step} ({entry.kind}) -> {entry.path}", highlight=False)


@app.command("list")
def list_(
    run: Path = typer.Argument(..., help="Run directory."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the entries as JSON here."),
) -> None:
    """Show the trajectory: step, kind, size, dtype, path."""
    from rlvrx.checkpoint import DTYPE_NAMES, Checkpoint
    from rlvrx.errors import CheckpointError

    traj = Trajectory.load(run)
    table = Table("step", "kind", "size", "dtype", "path", title=str(traj.manifest))
    rows = []
    for entry in traj:
        try:
            dtypes = ",".join(sorted(DTYPE_NAMES[d].lower() for d in Checkpoint(traj.resolve(entry)).dtypes()))
        except CheckpointError:
            dtypes = "[red]unreadable[/]"
        label = str(entry.step) if entry.grad_step is None else f"{entry.step} (grad {entry.grad_step})"
        table.add_row(label, entry.kind, _human(entry.bytes), dtypes, entry.path)
        rows.append({**entry.to_json(), "dtype": dtypes})
    console.print(table)
    write_json(json_path, rows)


@app.command()
def verify(
    run: Path = typer.Argument(..., help="Run directory."),
    no_hash: bool = typer.Option(False, "--no-hash", help="Skip the sha256 check."),
) -> None:
    """Check every checkpoint exists, matches its hash, and shares tensor names, shapes and dtypes."""
    traj = Trajectory.load(run)
    problems = traj.verify(hash=not no_hash)
    if problems:
        for line in problems:
            err_console.print(f"[red]x[/] {line}", highlight=False, soft_wrap=True)
        err_console.print(f"[bold red]{len(problems)} problem(s)[/] in {traj.manifest}", highlight=False)
        raise typer.Exit(1)
    console.print(f"[green]ok[/] {len(traj)} checkpoints, steps {traj.steps}", highlight=False)
