"""Verifiable tasks: prompts with ids and gold answers, plus a verifier. Importing this package is
cheap (no torch, no math-verify); see registry.get_task."""

from rlvrx.tasks.arithmetic import ArithmeticTask
from rlvrx.tasks.base import Example, Task
from rlvrx.tasks.math import INSTRUCTION, MathTask
from rlvrx.tasks.registry import BENCHMARK_TASKS, get_task, register_task, task_names, task_options
from rlvrx.verify.arithmetic import extract_integer

__all__ = [
    "Example",
    "Task",
    "ArithmeticTask",
    "MathTask",
    "INSTRUCTION",
    "BENCHMARK_TASKS",
    "extract_integer",
    "get_task",
    "register_task",
    "task_names",
    "task_options",
]
