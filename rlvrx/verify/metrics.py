"""pass@k, avg, maj@k and their aggregation over problems and tasks.

Per problem: n samples, c correct.
  - pass@k (unbiased, Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as the stable product
    1 - prod_{i=n-c+1..n} (1 - k/i); exactly 1.0 when n - c < k. Requires 1 <= k <= n.
  - avg (avg@n, mean accuracy): c / n. Over problems: the mean, and its standard error
    std(per-problem accuracies, ddof=1) / sqrt(#problems) (None with fewer than two problems).
  - maj@k: a vote among the FIRST k samples' answer keys (see GradeResult.answer_key: equivalent
    answers share a key); samples without an answer do not vote. Ties go to the answer whose first
    vote came earliest, which is deterministic and independent of correctness. The vote is correct
    when the winning answer's first sample was graded correct; no votes at all count as wrong.
Over a task: every metric is the mean over its problems, for k up to the smallest n of the task.
Overall: the unweighted mean over tasks of each metric all tasks have (the usual "average over
benchmarks"), with standard error sqrt(sum se_t^2) / T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from rlvrx.errors import UsageError

__all__ = [
    "pass_at_k",
    "estimate_pass_at_k",
    "majority_vote",
    "maj_at_k",
    "ProblemOutcome",
    "summarize_problems",
    "summarize_tasks",
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples of which c are correct."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def estimate_pass_at_k(num_samples: int | Sequence[int], num_correct: Sequence[int], k: int) -> list[float]:
    """human-eval's signature: pass@k per problem; num_samples is one n for all or one per problem."""
    counts = list(num_correct)
    samples = [num_samples] * len(counts) if isinstance(num_samples, int) else list(num_samples)
    if len(samples) != len(counts):
        raise ValueError(f"{len(samples)} sample counts for {len(counts)} correct counts")
    return [pass_at_k(n, c, k) for n, c in zip(samples, counts)]


def majority_vote(answer_keys: Sequence[str | None], correct: Sequence[bool]) -> tuple[str | None, bool]:
    """(winning answer key, whether it is correct); (None, False) when nobody answered."""
    if len(answer_keys) != len(correct):
        raise ValueError(f"{len(answer_keys)} answers for {len(correct)} verdicts")
    votes: dict[str, int] = {}
    first: dict[str, int] = {}
    for position, key in enumerate(answer_keys):
        if key is None:
            continue
        votes[key] = votes.get(key, 0) + 1
        first.setdefault(key, position)
    if not votes:
        return None, False
    winner = min(votes, key=lambda key: (-votes[key], first[key]))
    return winner, bool(correct[first[winner]])


def maj_at_k(answer_keys: Sequence[str | None], correct: Sequence[bool], k: int) -> float:
    if not 1 <= k <= len(answer_keys):
        raise ValueError(f"maj@k needs 1 <= k <= n = {len(answer_keys)}, got k={k}")
    return 1.0 if majority_vote(answer_keys[:k], correct[:k])[1] else 0.0


@dataclass
class ProblemOutcome:
    """The graded samples of one problem, in sample order. answer_keys default to no answers."""

    id: str
    correct: list[bool]
    answer_keys: list[str | None] = field(default_factory=list)

    def __post_init__(self):
        self.correct = [bool(c) for c in self.correct]
        if not self.answer_keys:
            self.answer_keys = [None] * len(self.correct)
        if len(self.answer_keys) != len(self.correct):
            raise UsageError(f"problem {self.id!r}: {len(self.answer_keys)} answers for {len(self.correct)} samples")

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def c(self) -> int:
        return sum(self.correct)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _stderr(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = _mean(values)
    variance = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(variance / len(values))


def summarize_problems(problems: Iterable[ProblemOutcome], k_list: Sequence[int] = (1,)) -> dict:
    """{"problems", "n", "avg", "avg_stderr", "pass@k"..., "maj@k"..., "stderr": {"avg", "pass@k"..., "maj@k"...}}
    for k in k_list up to n (n = the smallest sample count among the problems).

    Each metric is a mean over problems of a per-problem value x_i (fraction correct, unbiased pass@k,
    maj@k); its standard error is sqrt(sum (x_i - mean)^2 / (N - 1) / N) over the N problems (None for
    N < 2): the spread of the metric over problem sets drawn like this one, sampling noise included."""
    problems = list(problems)
    if not problems:
        raise UsageError("no graded problems to summarize")
    for problem in problems:
        if problem.n == 0:
            raise UsageError(f"problem {problem.id!r} has no graded samples")
    n = min(p.n for p in problems)
    accuracies = [p.c / p.n for p in problems]
    summary: dict = {"problems": len(problems), "n": n, "avg": _mean(accuracies), "avg_stderr": _stderr(accuracies)}
    errors = {"avg": summary["avg_stderr"]}
    ks = sorted({int(k) for k in k_list if 1 <= int(k) <= n})
    for k in ks:
        values = [pass_at_k(p.n, p.c, k) for p in problems]
        summary[f"pass@{k}"], errors[f"pass@{k}"] = _mean(values), _stderr(values)
    for k in ks:
        values = [maj_at_k(p.answer_keys, p.correct, k) for p in problems]
        summary[f"maj@{k}"], errors[f"maj@{k}"] = _mean(values), _stderr(values)
    summary["stderr"] = errors
    return summary


def summarize_tasks(by_task: Mapping[str, Iterable[ProblemOutcome]], k_list: Sequence[int] = (1,)) -> dict:
    """{task: summary, ..., "overall": macro average over tasks} (no "overall" for a single task)."""
    summaries = {task: summarize_problems(problems, k_list) for task, problems in by_task.items()}
    if len(summaries) > 1:
        summaries["overall"] = _overall(list(summaries.values()))
    return summaries


def _combined_stderr(errors: list[float | None]) -> float | None:
    """Standard error of a macro average over tasks (independent tasks): sqrt(sum e_t^2) / T."""
    return None if None in errors else math.sqrt(math.fsum(e * e for e in errors if e is not None)) / len(errors)


def _overall(summaries: list[dict]) -> dict:
    errors = [s["avg_stderr"] for s in summaries]
    overall: dict = {"tasks": len(summaries)}
    for key in summaries[0]:
        if not all(key in s for s in summaries):
            continue
        if key == "problems":
            overall[key] = sum(s[key] for s in summaries)
        elif key == "n":
            overall[key] = min(s[key] for s in summaries)
        elif key == "avg_stderr":
            overall[key] = _combined_stderr(errors)
        elif key == "stderr":
            shared = [m for m in summaries[0][key] if all(m in s[key] for s in summaries)]
            overall[key] = {m: _combined_stderr([s[key][m] for s in summaries]) for m in shared}
        else:
            overall[key] = _mean([s[key] for s in summaries])
    return overall
