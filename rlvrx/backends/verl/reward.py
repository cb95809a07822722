"""verl's reward entry point: `reward.custom_reward_function.path=pkg://rlvrx.backends.verl.reward`,
`name=compute_score`. It grades with the same task verifiers as the native trainer.

verl's naive reward manager calls `compute_score` from executor threads, where SIGALRM timeouts do
not work; so tasks with a grading kind are graded in one rlvrx GradingPool per process (a worker
subprocess with a hard per-item timeout), shared by the threads under a lock. Tasks without a
grading kind call `task.reward` in the calling thread.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from typing import Any

_pool = None
_pool_lock = threading.Lock()


@lru_cache(maxsize=32)
def _task(name: str, options_json: str):
    from rlvrx.tasks import get_task

    return get_task(name, **json.loads(options_json))


def _grading_pool():
    global _pool
    if _pool is None:
        from rlvrx.verify.pool import GradingPool

        _pool = GradingPool(workers=1)
    return _pool


def _plain(value: Any) -> Any:
    """numpy scalars / arrays (what parquet rows carry) -> Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def task_of(data_source: str, extra_info: dict | None, recipe_task: str | None = None):
    """The row's task. A 'module:function' name is code to import: it is taken only when it is the
    recipe's own task (`recipe_task`, from verl's command line), never on the data's word alone."""
    extra = extra_info or {}
    name = extra.get("task")
    if not name:
        prefix = "rlvrx/"
        if not str(data_source).startswith(prefix):
            raise ValueError(
                f"data_source {data_source!r} is not an rlvrx task and the row has no extra_info.task; "
                "write the data with `rlvrx train RECIPE --dry-run` (backend: verl)"
            )
        name = str(data_source)[len(prefix) :]
    if ":" in str(name) and str(name) != recipe_task:
        raise ValueError(
            f"the data names task {name!r}, code to import; a 'module:function' task is taken only from "
            f"the recipe's task.name (here {recipe_task!r}), not from a data file"
        )
    options = extra.get("task_options") or "{}"
    if not isinstance(options, str):
        options = json.dumps({k: _plain(v) for k, v in dict(options).items()}, sort_keys=True)
    return _task(str(name), options)


def compute_score(data_source, solution_str, ground_truth, extra_info=None, recipe_task=None, **kwargs) -> float:
    """1.0 when the task's verifier accepts `solution_str` against `ground_truth`, else 0.0."""
    from rlvrx.tasks import Example

    extra = dict(extra_info or {})
    task = task_of(data_source, extra, recipe_task)
    example = Example(id=str(extra.get("id", extra.get("index", ""))), prompt=str(extra.get("question", "")), answer=str(ground_truth))
    if task.grading_kind is None:
        return float(task.reward(solution_str, example))
    with _pool_lock:
        return float(task.rewards([solution_str], [example], pool=_grading_pool())[0])
