"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.verify.graders import BUILTIN_KINDS, DEFAULT_TIMEOUT, grade_one
from rlvrx.verify.pool import GradingPool, default_workers, grade_many
from rlvrx.verify.types import GradeItem, GradeResult

__all__ = [
    "GradeItem",
    "GradeResult",
    "GradingPool",
    "grade_one",
    "grade_many",
    "default_workers",
    "BUILTIN_KINDS",
    "DEFAULT_TIMEOUT",
]
