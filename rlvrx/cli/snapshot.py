"""`rlvrx snapshot scan|add|list|verify`: a run's trajectory manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from rlvrx.cli.common import console, err_console, write_json

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
    base: Optional[Path] = typer.Option(
        None, help="Register this model (a directory or hub id org/name[@revision]) as the starting point (step 0, kind base)."
    ),
    no_hash: bool = NO_HASH,
    replace: bool = typer.Option(False, help="Re-register steps that are already in the manifest."),
) -> None:
    """Discover checkpoints under DIRECTORY and register them in RUN/trajectory.json."""
    from rlvrx.trajectory import Trajectory  # imports torch: only when a command runs

    traj = Trajectory.load(run, create=True)
    added = []
    if base is not None:
        known = list(traj.entries)
        entry = traj.add(0, base, kind="base", hash=not no_hash, replace=replace)
        if not any(entry is e for e in known):  # re-running the same scan registers nothing new
            added.append(entry)
    added += traj.scan(directory, hash=not no_hash, replace=replace)
    if not traj.entries:
        err_console.print(f"[yellow]no checkpoints found under {directory}[/]")
        raise typer.Exit(1)
    traj.save()
    console.print(f"registered {len(added)} checkpoint(s); {traj.manifest} now holds steps {traj.steps}", highlight=False)


@app.command()
def add(
    run: Path = typer.Argument(..., help="Run directory."),
    path: Path = typer.Argument(..., help="Checkpoint directory (or hub id org/name[@revision]) to register."),
    step: int = typer.Option(..., "--step", help="Training step of this checkpoint."),
    kind: str = typer.Option("rl", help="base, rl or extrapolated."),
    no_hash: bool = NO_HASH,
    replace: bool = typer.Option(False, help="Replace an existing entry at this step."),
) -> None:
    """Register one checkpoint at a step."""
    from rlvrx.trajectory import Trajectory  # imports torch: only when a command runs

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
    from rlvrx.io.dtypes import torch_dtype_names
    from rlvrx.io.reader import Checkpoint
    from rlvrx.errors import CheckpointError

    from rlvrx.trajectory import Trajectory  # imports torch: only when a command runs

    traj = Trajectory.load(run)
    table = Table("step", "kind", "size", "dtype", "path", title=str(traj.manifest))
    rows = []
    for entry in traj:
        try:
            dtypes = ",".join(sorted(torch_dtype_names()[d].lower() for d in Checkpoint(traj.resolve(entry)).dtypes()))
        except CheckpointError:
            dtypes = "unreadable"
        label = str(entry.step) if entry.grad_step is None else f"{entry.step} (grad {entry.grad_step})"
        shown = "[red]unreadable[/]" if dtypes == "unreadable" else dtypes
        table.add_row(label, entry.kind, _human(entry.bytes), shown, entry.path)
        rows.append({**entry.to_json(), "dtype": dtypes})
    console.print(table)
    write_json(json_path, rows)


@app.command()
def verify(
    run: Path = typer.Argument(..., help="Run directory."),
    no_hash: bool = typer.Option(False, "--no-hash", help="Skip the sha256 check."),
) -> None:
    """Check every checkpoint exists, matches its hash, and shares tensor names, shapes and dtypes."""
    from rlvrx.trajectory import Trajectory  # imports torch: only when a command runs

    traj = Trajectory.load(run)
    problems = traj.verify(hash=not no_hash)
    if problems:
        for line in problems:
            err_console.print(f"[red]x[/] {escape(line)}", highlight=False, soft_wrap=True)
        err_console.print(f"[bold red]{len(problems)} problem(s)[/] in {escape(str(traj.manifest))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    console.print(f"[green]ok[/] {len(traj)} checkpoints, steps {traj.steps}", highlight=False)


@app.command()
def convert(
    path: Path = typer.Argument(..., help="A verl checkpoint: global_step_N (or its actor/ dir) holding FSDP shards."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output HF directory (default: global_step_N/huggingface, which `scan` finds)."),
    dtype: str = typer.Option(
        "bfloat16",
        "--dtype",
        help="bfloat16 (what verl's model merger writes), float32 (keep full precision: use it for linearity and "
        "extrapolation of small-lr runs) or auto (the dtype the shards hold).",
    ),
    run: Optional[Path] = typer.Option(None, "--run", help="Also register the result in RUN/trajectory.json."),
    step: Optional[int] = typer.Option(None, "--step", help="Step to register at (default: N of global_step_N)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output dir (only once the new one is complete)."),
    no_check: bool = typer.Option(
        False,
        "--no-check",
        help="Skip checking names and shapes against the model config.json describes (for models transformers cannot build).",
    ),
    no_hash: bool = NO_HASH,
) -> None:
    """Merge verl FSDP shards into HF safetensors, as verl's model merger does (no verl needed)."""
    from rlvrx.backends.verl.convert import convert_fsdp_checkpoint, step_of
    from rlvrx.errors import UsageError
    from rlvrx.trajectory import Trajectory

    written = convert_fsdp_checkpoint(path, out=out, dtype=dtype, overwrite=overwrite, check=not no_check)
    console.print(f"[green]wrote[/] {escape(str(written))} ({dtype})", highlight=False)
    if run is not None:
        step = step if step is not None else step_of(path)
        if step is None:
            raise UsageError(f"{path}: no global_step_N in the path; pass --step to register it")
        traj = Trajectory.load(run, create=True)
        traj.add(step, written, kind="rl", hash=not no_hash, replace=overwrite)
        traj.save()
        console.print(f"registered step {step} in {escape(str(traj.manifest))}", highlight=False)
