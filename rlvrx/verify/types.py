"""What grading takes and gives: GradeItem (completion, gold, kind) and GradeResult."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple


class GradeItem(NamedTuple):
    completion: str
    gold: str
    kind: str = "math"


@dataclass(frozen=True)
class GradeResult:
    """correct: the verdict; extracted: the answer found in the completion (None if none);
    answer_key: a normalised form of it for majority voting (equal keys = the same answer);
    status: "ok" | "timeout" | "error"; error: what went wrong, for status != "ok"."""

    correct: bool
    extracted: str | None = None
    answer_key: str | None = None
    status: str = "ok"
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
