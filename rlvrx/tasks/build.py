"""Building tasks for a run over models: by name with options, over a data file, or as a grader only
(for a generations file); shared by eval and logits extrapolation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from rlvrx.errors import ParameterError, UsageError
from rlvrx.tasks.base import Example, Task

__all__ = ["build_tasks", "grading_task", "has_verifier", "task_max_new_tokens"]


def build_tasks(
    names: Sequence[str] = (),
    data: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    problem_key: str = "problem",
    answer_key: str = "answer",
    id_key: str = "id",
    options: dict | None = None,
) -> list[Task]:
    """Tasks by name (built-ins, benchmarks, 'package.module:function'), plus a math task over `data`
    (a JSONL/parquet file) named after the file. `options` go to every task that accepts them;
    data_dir goes to the benchmark tasks."""
    from rlvrx.tasks.registry import get_task, task_options

    options = dict(options or {})
    tasks: list[Task] = []
    used: set[str] = set()
    for name in names:
        accepted = task_options(name)
        kwargs = {}
        if accepted is None or "data_dir" in accepted:
            if data_dir is not None:
                kwargs["data_dir"] = str(data_dir)
        for key, value in options.items():
            if accepted is None or key in accepted:
                kwargs[key] = value
                used.add(key)
        tasks.append(get_task(name, **kwargs))
    if data is not None:
        from rlvrx.tasks.math import MathTask

        path = Path(data).expanduser()
        extra = {k: v for k, v in options.items() if k == "instruction"}
        used.update(extra)
        tasks.append(MathTask(data=str(path), data_dir=data_dir, problem_key=problem_key, answer_key=answer_key, id_key=id_key, name=path.stem, **extra))
    unused = sorted(set(options) - used)
    if unused:
        raise UsageError(f"task option {unused[0]!r} applies to none of the tasks ({', '.join(t.name for t in tasks) or 'none'})")
    seen: set[str] = set()
    for task in tasks:
        if task.name in seen:
            raise UsageError(f"task {task.name!r} is given twice")
        seen.add(task.name)
    if not tasks:
        raise ParameterError("no task: pass {names:NAME} (arithmetic, aime24, aime25, math500, gsm8k, ...) or {data:FILE}", "names", "data")
    return tasks


def grading_task(task_name: str | None, options: dict | None = None) -> Task:
    """The task that grades a generations file of `task_name`: math-verify for math-like tasks
    (no data needed), else the named task built with `options`."""
    from rlvrx.tasks.registry import BENCHMARK_TASKS, get_task

    if task_name is None or task_name == "math" or task_name in BENCHMARK_TASKS:
        return _KindTask(task_name or "math", "math")
    return get_task(task_name, **(options or {}))


def has_verifier(task: Task) -> bool:
    """A grading kind for the worker pool, or its own `grade`."""
    return task.grading_kind is not None or type(task).grade is not Task.grade


def task_max_new_tokens(task: Task) -> int | None:
    """A task-appropriate length limit, when the task has a natural one (arithmetic: 2 * digits + 2)."""
    from rlvrx.tasks.arithmetic import ArithmeticTask

    if isinstance(task, ArithmeticTask):
        return 2 * task.digits + 2
    return None


class _KindTask(Task):
    """Grading only: a task that is nothing but a grading kind (for generations files)."""

    def __init__(self, name: str, kind: str):
        self.name = name
        self.grading_kind = kind

    def examples(self, split: str) -> list[Example]:
        raise UsageError(f"task {self.name!r} here only grades; it has no examples")

    def format_prompt(self, example: Example, tokenizer=None) -> str:
        return example.prompt
