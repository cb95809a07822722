"""`rlvrx run`: a recipe's `stages:` run in order, each one an rlvrx command on the run directory.

A stage is the command a user would type: its positional `args` and `options` (long option names,
dashes or underscores) become the command line, with `{run}` replaced by the run directory and
`{recipe}` by the recipe file. An eval stage without `out` writes its results into RUN/eval, whatever
the models (rlvrx.eval.runner.resolve_model names the folders). Every stage writes its JSON summary to RUN/stages/NAME.json; a marker
RUN/stages/NAME.done records the exact command, so a rerun skips finished stages (and reruns one whose
command changed, replacing its outputs). A stage whose `task` is the recipe's task gets the recipe's task settings (recipe_task_options). A failed stage stops the run with its error; everything done before stays. With trackers
(`logger:`), each finished stage's summary numbers go to the run directory's tracker run (rlvrx.train.tracking).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from rlvrx.cli.common import message
from rlvrx.io.atomic import atomic_write_text
from rlvrx.config import Recipe, StageConfig, TaskConfig, find_recipe
from rlvrx.errors import RlvrxError, UsageError
from rlvrx.io.jsonio import read_json
from rlvrx.rundir import RunDir

# The command of each stage kind (the kinds themselves: rlvrx.config.STAGE_KINDS).
COMMANDS = {
    "train": ("train",),
    "rl-extra": ("rl-extra",),
    "linearity-weights": ("linearity", "weights"),
    "linearity-logprobs": ("linearity", "logprobs"),
    "extrapolate-weights": ("extrapolate", "weights"),
    "extrapolate-logits": ("extrapolate", "logits"),
    "eval": ("eval",),
    "linearity-rank": ("linearity", "rank"),
    "extrapolate-compare": ("extrapolate", "compare"),
}
# Positional arguments when a stage gives none.
DEFAULT_ARGS = {
    "train": ["{recipe}"],
    "rl-extra": ["{recipe}"],
    "linearity-weights": ["{run}"],
    "linearity-logprobs": ["{run}"],
    "extrapolate-weights": ["{run}"],
    "extrapolate-logits": ["{run}"],
    "eval": ["{run}:last"],
    "linearity-rank": ["{run}"],
    "extrapolate-compare": ["{run}"],
}


def stage_name(stage: StageConfig) -> str:
    return stage.name or stage.kind


def _click_command(kind: str):
    import typer

    from rlvrx.cli import app

    command = typer.main.get_command(app)
    for part in COMMANDS[kind]:
        command = command.commands[part]
    return command


def _option_flags(kind: str) -> dict[str, Any]:
    """Long option name (without dashes) -> click parameter, for a stage's command."""
    flags = {}
    for param in _click_command(kind).params:
        for opt in getattr(param, "opts", []):
            if opt.startswith("--"):
                flags[opt[2:]] = param
    return flags


def check_stages(recipe: Recipe) -> list[str]:
    """Every problem with the stages' names and options, before any work starts."""
    problems = []
    names = [stage_name(s) for s in recipe.stages]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"stages: name {name!r} is used twice; give the stages distinct `name`s")
    for i, stage in enumerate(recipe.stages):
        flags = _option_flags(stage.kind)
        for key in stage.options:
            flag = key.replace("_", "-")
            if flag in ("json", "no-progress"):
                problems.append(f"stages[{i}] ({stage_name(stage)}).options.{key}: set by `rlvrx run` itself")
            elif flag not in flags:
                close = difflib.get_close_matches(flag, list(flags), n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; options of `rlvrx {' '.join(COMMANDS[stage.kind])}`: {', '.join(sorted(flags))}"
                problems.append(f"stages[{i}] ({stage_name(stage)}).options.{key}: unknown option{hint}")
            elif flag == "task":
                problems += [f"stages[{i}] ({stage_name(stage)}).options.{key}: {problem}" for problem in _task_problems(stage.options[key])]
    return problems


def _task_problems(value) -> list[str]:
    """Unknown names among a stage's task option (a name, a comma-separated list, or a list of them)."""
    from rlvrx.tasks.registry import unknown_task

    names = [part.strip() for item in (value if isinstance(value, list) else [value]) for part in str(item).split(",") if part.strip()]
    return [problem for problem in map(unknown_task, names) if problem is not None]


# Task settings a stage does not take from the recipe: the task's name, and a math task's cap on its training problems.
_NOT_CARRIED = ("name", "limit")


def recipe_task_options(stage: StageConfig, task: TaskConfig | None) -> list[str]:
    """`--task-option` values that carry the recipe's task settings (digits, operators, seed, data_dir, ...)
    to a stage whose `task` is the recipe's task and that sets no `task_option` itself, so the stage sees
    the problems the model was trained on. Only settings that differ from the defaults are passed."""
    from rlvrx.tasks.registry import task_options

    options = {key.replace("_", "-"): value for key, value in stage.options.items()}
    named = options.get("task")
    names = [part.strip() for item in (named if isinstance(named, list) else [named]) for part in str(item).split(",")]
    if task is None or "task-option" in options or task.name not in names:
        return []
    accepted = task_options(task.name)
    defaults = TaskConfig()
    pairs = []
    for key, value in task.model_dump().items():
        if key in _NOT_CARRIED or value == getattr(defaults, key) or (accepted is not None and key not in accepted):
            continue
        pairs.append(f"{key}={json.dumps(value)}")  # JSON is YAML: `operators=["*"]` reads back as a list
    return pairs


def stage_argv(stage: StageConfig, run_dir: Path, recipe_path: Path, overrides: Sequence[str], json_path: Path, task: TaskConfig | None = None) -> list[str]:
    """The full command line of one stage (what a user would type after `rlvrx`); `task`: the recipe's task
    (rlvrx.cli.pipeline.recipe_task_options)."""

    def fill(value: str) -> str:
        return str(value).replace("{run}", str(run_dir)).replace("{recipe}", str(recipe_path))

    argv = list(COMMANDS[stage.kind])
    argv += [fill(a) for a in (stage.args or DEFAULT_ARGS[stage.kind])]
    if stage.kind in ("train", "rl-extra"):
        argv += list(overrides)
    flags = _option_flags(stage.kind)
    for key, value in stage.options.items():
        flag = key.replace("_", "-")
        param = flags[flag]
        values = value if isinstance(value, list) else [value]
        if getattr(param, "is_flag", False):
            if value:
                argv.append(f"--{flag}")
            continue
        for item in values:
            argv += [f"--{flag}", fill(item)]
    if "task-option" in flags:
        for pair in recipe_task_options(stage, task):
            argv += ["--task-option", pair]
    if stage.kind == "eval" and "out" not in {key.replace("_", "-") for key in stage.options}:
        argv += ["--out", str(RunDir(run_dir).eval)]
    argv += ["--json", str(json_path)]
    if "no-progress" in flags and not _interactive():
        argv.append("--no-progress")
    return argv


def _interactive() -> bool:
    import sys

    return sys.stderr.isatty() and not os.environ.get("CI")


def invoke(argv: list[str]) -> int:
    """Run one rlvrx command in this process; its RlvrxError propagates, its exit code is returned."""
    import typer

    from rlvrx.cli import app

    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="rlvrx", standalone_mode=False)
    except SystemExit as exc:  # a command that calls sys.exit
        return int(exc.code or 0)
    except Exception as exc:
        # click's usage errors and Exit carry exit codes; anything else is the command's own failure
        code = getattr(exc, "exit_code", None)
        if code is not None and not isinstance(exc, RlvrxError):
            if code and hasattr(exc, "format_message"):
                raise UsageError(f"rlvrx {' '.join(argv[:2])}: {exc.format_message()}") from None
            return int(code)
        raise
    return int(result or 0) if isinstance(result, int) else 0


def run_pipeline(
    recipe_source: str | os.PathLike,
    overrides: Sequence[str] = (),
    only: str | None = None,
    start_from: str | None = None,
    echo=print,
) -> list[dict]:
    """Run the recipe's stages in order; return [{name, kind, status, argv}] (status: done|skipped)."""
    from rlvrx.config import load_recipe

    recipe_path = find_recipe(recipe_source)
    recipe = load_recipe(recipe_path, list(overrides))
    if not recipe.stages:
        raise UsageError(f"{recipe_path}: no `stages:` to run; add stages, or use `rlvrx train` for a training recipe")
    problems = check_stages(recipe)
    if problems:
        raise UsageError(f"{recipe_path}: " + "; ".join(problems))
    names = [stage_name(s) for s in recipe.stages]
    for flag, value in (("--only", only), ("--from", start_from)):
        if value is not None and value not in names:
            close = difflib.get_close_matches(value, names, n=1)
            raise UsageError(f"{flag} {value}: no such stage" + (f"; did you mean {close[0]}?" if close else f"; stages: {', '.join(names)}"))
    run_dir = Path(recipe.output.dir)
    rd = RunDir(run_dir)
    rd.stages.mkdir(parents=True, exist_ok=True)
    results = []
    started = start_from is None
    for stage in recipe.stages:
        name = stage_name(stage)
        started = started or name == start_from
        if not started or (only is not None and name != only):
            continue
        json_path = rd.stage_summary(name)
        argv = stage_argv(stage, run_dir, recipe_path, overrides, json_path, recipe.task)
        marker = rd.stage_marker(name)
        previous = read_json(marker, dict).get("argv") if marker.is_file() else None
        if previous == argv and json_path.is_file() and only is None:
            echo(f"[skip] {name}: finished earlier ({marker})")
            results.append({"name": name, "kind": stage.kind, "status": "skipped", "argv": argv})
            continue
        run_argv = argv
        if previous is not None and previous != argv and "--overwrite" not in argv and "overwrite" in _option_flags(stage.kind):
            run_argv = argv + ["--overwrite"]  # the marker keeps argv, so the next run skips the stage
            echo(f"[stage] {name}: its command changed since it finished; its outputs are replaced")
        echo(f"[stage] {name}: rlvrx {' '.join(run_argv)}")
        try:
            code = invoke(run_argv)
        except RlvrxError as exc:  # worded as the stage's command words it (flags, not parameters)
            cls = type(exc) if type(exc).__init__ is RlvrxError.__init__ else UsageError if exc.exit_code == 2 else RlvrxError
            raise cls(f"stage {name} failed: {message(exc)}") from None
        if code:
            raise RlvrxError(f"stage {name} failed with exit code {code}; earlier stages' results are kept in {run_dir}")
        atomic_write_text(marker, json.dumps({"argv": argv, "kind": stage.kind}, indent=2) + "\n")
        if json_path.is_file():
            from rlvrx.train.tracking import log_stage_summary

            log_stage_summary(recipe.logger, run_dir, name, read_json(json_path))
        results.append({"name": name, "kind": stage.kind, "status": "done", "argv": argv})
    return results
