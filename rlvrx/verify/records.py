"""Graded records: grading the samples of a batch of problems, and the metrics of graded records.

One path for eval (which streams a batch's verdicts into its result file, rlvrx.eval.runner) and for
logits extrapolation (which grades a whole generations file at once): `grade_completions` yields
each sample's verdict as it finishes, from the worker pool for a task with a grading kind, in
process for a task that overrides `Task.grade`. Records are the lines of rlvrx.generation.generations
(`correct`, `answer_key`, `status` lists, one entry per completion).
"""

from __future__ import annotations

from typing import Any, Generator, Sequence

from rlvrx.verify import metrics

__all__ = [
    "default_k_list",
    "failure_counts",
    "grade_completions",
    "grading_pool",
    "record_outcome",
    "summarize_records",
]


def grading_pool(workers: int | None = None, timeout: float | None = None):
    """A GradingPool (worker processes; a context manager) with `timeout` seconds per answer (None: the default)."""
    from rlvrx.verify.graders import DEFAULT_TIMEOUT
    from rlvrx.verify.pool import GradingPool

    return GradingPool(workers=workers, timeout=DEFAULT_TIMEOUT if timeout is None else timeout)


def grade_completions(task, examples: Sequence, completions: Sequence[Sequence[str]], pool=None) -> Generator[tuple[int, int, Any], None, None]:
    """(problem index, sample index, GradeResult) for every completion, as each finishes. `pool` (a
    GradingPool) grades tasks with a grading kind; a task without one grades in this process (it
    overrides Task.grade). Close the iterator when stopping early: that stops the pool's work."""
    owners = [(p, j) for p, c in enumerate(completions) for j in range(len(c))]
    if task.grading_kind is None:
        stream = ((i, task.grade(completions[p][j], examples[p])) for i, (p, j) in enumerate(owners))
    else:
        stream = pool.imap_unordered([task.grade_item(completions[p][j], examples[p]) for p, j in owners])
    try:
        for index, verdict in stream:
            p, j = owners[index]
            yield p, j, verdict
    finally:
        stream.close()


def default_k_list(n: int) -> list[int]:
    """1, 4, 16, 64, ... up to n, and n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 4
    return sorted(set(ks) | {n})


def record_outcome(record: dict):
    """A graded record -> metrics.ProblemOutcome (verdicts and answer keys in sample order)."""
    return metrics.ProblemOutcome(str(record["id"]), list(record["correct"]), list(record["answer_key"]))


def failure_counts(records) -> dict:
    """{"timeouts": samples whose grading timed out, "errors": samples whose grading failed}."""
    counts = {"timeouts": 0, "errors": 0}
    for record in records:
        for status in record["status"]:
            if status == "timeout":
                counts["timeouts"] += 1
            elif status == "error":
                counts["errors"] += 1
    return counts


def summarize_records(records: Sequence[dict], k_list: Sequence[int] | None = None) -> dict:
    """Metrics of one task's graded records (see rlvrx.verify.metrics), plus sample counts that were
    graded wrong because grading timed out or failed."""
    outcomes = [record_outcome(r) for r in records]
    n = min(o.n for o in outcomes) if outcomes else 1
    summary = metrics.summarize_problems(outcomes, k_list or default_k_list(n))
    summary.update(failure_counts(records))
    return summary
