"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.verify.metrics import (
    ProblemOutcome,
    estimate_pass_at_k,
    maj_at_k,
    majority_vote,
    pass_at_k,
    summarize_problems,
    summarize_tasks,
)

__all__ = [
    "pass_at_k",
    "estimate_pass_at_k",
    "majority_vote",
    "maj_at_k",
    "ProblemOutcome",
    "summarize_problems",
    "summarize_tasks",
]
