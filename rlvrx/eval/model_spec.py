"""What an eval runs over: a model (a checkpoint directory, or RUN:STEP of a run's trajectory) or a
generations file, with the table name it reports under and the folder its results go to."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from rlvrx.errors import UsageError
from rlvrx.hub import model_dir, parse_hub_id
from rlvrx.models import check_weights
from rlvrx.rundir import RunDir

__all__ = ["ModelSpec", "generations_spec", "resolve_model", "safe_name"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=@-]+")


def safe_name(name: str) -> str:
    """A file/directory name for a model or task name ('runs/a:200' -> 'runs-a-200')."""
    cleaned = _UNSAFE.sub("-", str(name)).strip("-.")
    return cleaned or "model"


@dataclass
class ModelSpec:
    """name: the table column / JSON key; out_dir: where `<task>.jsonl` files go. Exactly one of
    path (a checkpoint dir) and generations (a generations file) is set."""

    name: str
    out_dir: Path
    path: Path | None = None
    generations: Path | None = None
    task: str | None = None  # generations: the task its records belong to, when known
    run_dir: Path | None = None
    step: int | None = None


def _find_run(path: Path) -> tuple[Path, int] | None:
    """(run dir, step) when `path` is a checkpoint registered in a trajectory.json of an ancestor."""
    from rlvrx.trajectory import MANIFEST, Trajectory

    resolved = path.resolve()
    for parent in list(resolved.parents)[:3]:
        if (parent / MANIFEST).is_file():
            try:
                trajectory = Trajectory.load(parent)
            except UsageError:
                return None
            for entry in trajectory:
                if trajectory.resolve(entry).resolve() == resolved:
                    return parent, entry.step
    return None


def resolve_model(arg: str, out: str | os.PathLike | None = None, name: str | None = None) -> ModelSpec:
    """A model argument -> ModelSpec. `arg` is a checkpoint dir, RUN:STEP (a run dir holding
    trajectory.json, and one of its steps) or a hub id org/name[@revision] (named so, under ./eval). Models of a run's trajectory are named RUN:STEP and write
    to RUN/eval/step_NNNNNN; other checkpoints inside a run (RUN/extrapolated/step_NNNNNN) write to
    RUN/eval/<their path in the run, dashed>; others are named by their directory, under ./eval. With
    `out` (other than RUN/eval), folders of run models carry the run's name. The weight files are
    checked here (headers and sizes), before any work."""
    from rlvrx.trajectory import MANIFEST, Trajectory, step_dir_name

    path = Path(arg).expanduser()
    run_dir = step = None
    if path.is_dir():
        if (path / MANIFEST).is_file() and not (path / "config.json").is_file():
            steps = Trajectory.load(path).steps
            raise UsageError(f"{arg} is a run directory; name one of its checkpoints as {arg}:STEP (steps: {steps})")
        found = _find_run(path)
        if found is not None:
            run_dir, step = found
    elif ":" in arg:
        run_text, _, step_text = arg.rpartition(":")
        run_dir = Path(run_text).expanduser()
        trajectory = Trajectory.load(run_dir)
        if step_text in ("last", "latest"):
            if not trajectory.steps:
                raise UsageError(f"{trajectory.manifest}: no checkpoints")
            step = trajectory.steps[-1]
        else:
            try:
                step = int(step_text)
            except ValueError:
                raise UsageError(f"{arg}: expected RUN:STEP with an integer step (or RUN:last)") from None
        path = trajectory.path_of(step)
    elif parse_hub_id(arg) is not None:
        path = model_dir(arg)
        name = name or arg
    else:
        raise UsageError(f"{arg}: no such model directory; give a checkpoint directory, RUN:STEP (a run directory and a step) or a hub id org/name[@revision]")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UsageError(f"{path}: not a model checkpoint directory (no config.json)")
    check_weights(path)
    owner = run_dir if run_dir is not None else _enclosing_run(path)
    base = Path(out) if out is not None else (RunDir(owner).eval if owner is not None else Path("eval"))
    prefix = "" if owner is None or base.resolve() == RunDir(owner).eval.resolve() else f"{owner.resolve().name}-"
    if run_dir is not None:
        display = name or f"{run_dir.resolve().name}:{step}"
        folder = safe_name(name) if name else safe_name(prefix + step_dir_name(step))
    else:
        display = name or path.resolve().name
        if name or owner is None:
            folder = safe_name(display)
        else:
            folder = safe_name(prefix + "-".join(path.resolve().relative_to(owner.resolve()).parts))
    return ModelSpec(name=display, out_dir=base / folder, path=path, run_dir=run_dir, step=step)


def _enclosing_run(path: Path) -> Path | None:
    from rlvrx.trajectory import MANIFEST

    for parent in list(path.resolve().parents)[:3]:
        if (parent / MANIFEST).is_file():
            return parent
    return None


def generations_spec(file: str | os.PathLike, out: str | os.PathLike | None = None, name: str | None = None) -> ModelSpec:
    """A generations file -> ModelSpec. Named by `name`, else, for a file laid out as
    `<model>/<task>.jsonl` (a known task name), by its folder, else by the file's stem. Grades go to
    OUT/<name>/<task>.jsonl; OUT defaults to RUN/eval for a file inside a run, else ./eval."""
    from rlvrx.tasks.registry import task_names

    file = Path(file).expanduser()
    if not file.is_file():
        raise UsageError(f"{file}: no such generations file")
    task = file.stem if file.stem in task_names() else None
    display = name or (file.resolve().parent.name if task else file.stem)
    run = _enclosing_run(file)
    base = Path(out) if out is not None else (RunDir(run).eval if run is not None else Path("eval"))
    return ModelSpec(name=display, out_dir=base / safe_name(display), generations=file, task=task)
