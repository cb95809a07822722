"""Tasks by name: built-ins, benchmark names, or a dotted `package.module:function` returning a Task."""

from __future__ import annotations

import difflib
import inspect
from typing import Callable

from rlvrx.errors import UsageError
from rlvrx.tasks.arithmetic import ArithmeticTask
from rlvrx.tasks.base import Task
from rlvrx.tasks.math import INSTRUCTION, MathTask
from rlvrx.verify.graders import import_dotted

BENCHMARK_TASKS = ("aime24", "aime25", "math500", "gsm8k")


def _benchmark(name: str) -> Callable[..., Task]:
    def make(data_dir=None, limit=None, ids=None, instruction=INSTRUCTION) -> Task:
        return MathTask(data=name, data_dir=data_dir, limit=limit, ids=ids, instruction=instruction, name=name)

    make.__name__ = name
    return make


_REGISTRY: dict[str, Callable[..., Task]] = {
    "arithmetic": ArithmeticTask,
    "math": MathTask,
    **{name: _benchmark(name) for name in BENCHMARK_TASKS},
}


def task_names() -> list[str]:
    return sorted(_REGISTRY)


def register_task(name: str, factory: Callable[..., Task]) -> None:
    """Make `factory(**options) -> Task` available as `name`."""
    _REGISTRY[name] = factory


def task_options(name: str) -> set[str] | None:
    """The option names a task accepts (None: any, for factories taking **kwargs)."""
    factory = _factory(name)
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: let the factory judge
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "name"}


def get_task(name: str, **options) -> Task:
    """A task by registered name or `package.module:function`, built with `options`."""
    accepted = task_options(name)
    if accepted is not None:
        unknown = sorted(set(options) - accepted)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, sorted(accepted), n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise UsageError(f"task {name!r} has no option {', '.join(hints)}; its options: {', '.join(sorted(accepted)) or 'none'}")
    task = _factory(name)(**options)
    if not isinstance(task, Task):
        raise UsageError(f"task {name!r}: the factory returned {type(task).__name__}, not an rlvrx.tasks.Task")
    return task


def unknown_task(name: str) -> str | None:
    """None for a registered task name or a 'package.module:function' path (not imported here),
    else the message naming the known tasks, with a did-you-mean."""
    if name in _REGISTRY or (isinstance(name, str) and ":" in name):
        return None
    close = difflib.get_close_matches(str(name), task_names(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown task {name!r}; {hint}known tasks: {', '.join(task_names())}, or 'package.module:function' returning a Task"


def _factory(name: str) -> Callable[..., Task]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    problem = unknown_task(name)
    if problem is not None:
        raise UsageError(problem)
    return _import_factory(name)


def _import_factory(path: str) -> Callable[..., Task]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UsageError(f"task {path!r}: write a custom task as 'package.module:function'")
    return import_dotted(path, "task")
