"""Shared CLI plumbing: consoles, one-line errors, JSON summaries."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NoReturn

from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from rlvrx.errors import RlvrxError

DEBUG = False
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


# Library parameters whose CLI flag is not `--` + the name with `-` for `_` (the default rule)
FLAG_ALIASES = {
    "run": "RUN",
    "copy_patterns": "--copy-pattern",
    "names": "--task",
    "gold_key": "--answer-key",
}


def flag(param: str) -> str:
    """The CLI flag that sets library parameter `param` (FLAG_ALIASES, else foo_bar -> --foo-bar)."""
    return FLAG_ALIASES.get(param) or "--" + param.replace("_", "-")


def message(exc: RlvrxError, flags: Mapping[str, str] | None = None) -> str:
    """exc's one-line message for a CLI user: a ParameterError names the flags (a command's own
    `flags` {parameter: flag} first, then flag()); any other error reads as str(exc)."""
    from rlvrx.errors import ParameterError

    if isinstance(exc, ParameterError):
        return exc.worded({p: (flags or {}).get(p) or flag(p) for p in exc.params})
    return str(exc)


def warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def quiet_libraries() -> None:
    """Silence transformers' (and mlflow's) progress bars and info logs; rlvrx draws its own."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # --logger mlflow: no INFO lines about its tables


def write_json(path: str | os.PathLike | None, data: Any) -> None:
    """Write a machine-readable summary atomically (no-op when path is None)."""
    if path is None:
        return
    from rlvrx.io.atomic import atomic_write_text

    atomic_write_text(Path(path), json.dumps(data, indent=2, default=str) + "\n")


def task_options(pairs: list[str]) -> dict:
    """`--task-option KEY=VALUE` pairs -> {key: YAML-typed value}."""
    from rlvrx.errors import UsageError
    from rlvrx.io.yamlio import load_yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--task-option {pair!r}: expected KEY=VALUE, e.g. digits=3")
        options[key.strip()] = load_yaml(value, f"--task-option {key.strip()}")
    return options
