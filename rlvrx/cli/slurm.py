"""`rlvrx slurm RECIPE [KEY=VALUE...] --command train|rl-extra|eval|linearity --nodes N --gpus-per-node G [--submit]`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from rlvrx.cli.common import console, write_json
from rlvrx.cli.recipe import OVERRIDES_ARG, RECIPE_ARG


# build_scripts' parameters and SlurmOptions' fields -> the flag (or recipe key) that sets them here
FLAGS = {
    "command": "--command",
    "run_dir": "output.dir",
    "out_dir": "--out",
    "nodes": "--nodes",
    "gpus_per_node": "--gpus-per-node",
    "cpus_per_task": "--cpus-per-task",
    "shards": "--shards",
    "partition": "--partition",
    "time": "--time",
    "account": "--account",
    "sbatch_args": "--sbatch",
    "python": "--python",
}


def slurm(
    recipe: str = RECIPE_ARG,
    overrides: Optional[List[str]] = OVERRIDES_ARG,
    command: str = typer.Option(
        "train", "--command", help="train or rl-extra (verl on a Ray cluster over the nodes), eval (one job), linearity (array + merge)."
    ),
    nodes: int = typer.Option(1, "--nodes", help="Nodes of the training job (Ray head on the first)."),
    gpus_per_node: int = typer.Option(8, "--gpus-per-node", help="GPUs per node (linearity runs on CPUs and ignores it)."),
    cpus_per_task: Optional[int] = typer.Option(None, "--cpus-per-task", help="CPUs per node (train) or per array task."),
    partition: Optional[str] = typer.Option(None, "--partition", help="Slurm partition."),
    time: Optional[str] = typer.Option(None, "--time", help="Time limit, e.g. 2-00:00:00."),
    account: Optional[str] = typer.Option(None, "--account", help="Account to charge."),
    shards: Optional[int] = typer.Option(None, "--shards", help="linearity: array tasks, each `--shard I/K` of the tensors [4]."),
    args: str = typer.Option("", "--args", help='Arguments of the analysis command, one string, e.g. --args "--sample 0.001" (eval: models and --task).'),
    sbatch: List[str] = typer.Option([], "--sbatch", help="Extra #SBATCH option (repeat), e.g. --sbatch=--qos=high."),
    python: Optional[str] = typer.Option(None, "--python", help="Python that runs rlvrx (and verl) on the nodes [this one]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for the scripts (default: RUN/slurm, RUN being the recipe's output.dir)."),
    submit: bool = typer.Option(False, "--submit", help="Submit with sbatch (the merge job after the array, --dependency=afterok)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write {scripts, submit_sh, job_ids} here."),
) -> None:
    """Render sbatch scripts for a recipe's run (and submit them with --submit)."""
    import sys

    from rlvrx.backends.slurm import SlurmOptions, build_scripts, submit as submit_scripts, write_scripts
    from rlvrx.config import find_recipe, load_recipe
    from rlvrx.errors import ParameterError, UsageError

    resolved = load_recipe(recipe, overrides or [])
    run_dir = Path(resolved.output.dir).resolve()
    extra = shlex.split(args)
    if command == "eval" and not extra:
        raise UsageError('--command eval needs the eval arguments, e.g. --args "RUN --task aime24 -n 64"')
    if command in ("train", "rl-extra") and resolved.backend != "verl":
        console.print("[yellow]note:[/] backend is native: the job runs on the first node only", highlight=False)
    opts = SlurmOptions(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task,
        partition=partition,
        time=time,
        account=account,
        shards=shards,
        python=python or sys.executable,
        sbatch_args=list(sbatch),
    )
    out_dir = (out or run_dir / "slurm").resolve()
    try:
        scripts = build_scripts(command, str(find_recipe(recipe).resolve()), list(overrides or []), run_dir, extra, opts, out_dir)
    except ParameterError as exc:  # the same message, naming the flag (or recipe key) that set the parameter
        raise UsageError(exc.worded({p: FLAGS.get(p, p) for p in exc.params})) from None
    submit_sh = write_scripts(scripts, out_dir)
    for s in scripts:
        after = f" (after {s.depends_on})" if s.depends_on else ""
        console.print(f"[green]wrote[/] {escape(str(s.path))}{after}", highlight=False)
    ids = {}
    if submit:
        ids = submit_scripts(scripts)
        for name, job_id in ids.items():
            console.print(f"submitted {name}: job {job_id}", highlight=False)
    else:
        console.print(f"submit with: bash {escape(str(submit_sh))}", highlight=False)
    write_json(json_path, {"scripts": [str(s.path) for s in scripts], "submit_sh": str(submit_sh), "job_ids": ids})
