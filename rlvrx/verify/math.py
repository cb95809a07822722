"""The math verifier: math-verify, with the gold answer parsed first.

`grade_math`: the gold answer is wrapped as `\\boxed{gold}` (unless it already holds a \\boxed) and
parsed first, then the completion is parsed with math-verify's default extraction (LaTeX, then plain
expressions), then `verify(gold, answer)`. math-verify joins all the \\boxed{} of a completion:
"\\boxed{3} ... \\boxed{2}" is the set {2, 3}, which equals no single gold answer (a completion that
boxes an intermediate result is wrong). Timeouts are not math-verify's (SIGALRM, main thread only)
but the caller's: rlvrx.verify.graders runs this under its own alarm in-process, and the worker pool
under a hard kill. math_verify is imported on first use, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from rlvrx.errors import RlvrxError


class _DropTimeoutDisabledWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_filter_installed = False


def _math_verify():
    global _filter_installed
    import math_verify

    if not _filter_installed:  # we pass timeouts of None on purpose: our caller enforces them
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
        _filter_installed = True
    return math_verify


def gold_latex(gold) -> str:
    gold = str(gold).strip()
    return gold if "\\boxed" in gold else "\\boxed{" + gold + "}"


@lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    return _math_verify().parse(gold_latex(gold), parsing_timeout=None)


def parse_answer(completion: str):
    """math-verify's parse of a completion: [] or [sympy object or str, extracted string]."""
    return _math_verify().parse(completion, parsing_timeout=None)


def extracted_text(parsed) -> str | None:
    if not parsed:
        return None
    if len(parsed) > 1 and isinstance(parsed[1], str):
        return parsed[1]
    return str(parsed[0])


def answer_key(parsed) -> str | None:
    """A normal form for majority voting: numbers by value (10 significant digits, so 1/2 and 0.5
    vote together), other expressions by sympy's printed form (sets print sorted), strings with
    whitespace collapsed. Coarser than verify (e.g. 50% and 50 get different keys)."""
    if not parsed:
        return None
    expr = parsed[0]
    if isinstance(expr, str):
        return " ".join(expr.split()) or None
    try:
        if getattr(expr, "is_number", False):
            value = expr.evalf(15)
            if value.is_real and value.is_finite:
                return f"{float(value):.10g}"
    except (TypeError, ValueError, OverflowError, AttributeError):
        pass
    return str(expr)


def grade_math(completion: str, gold: str) -> tuple[bool, str | None, str | None]:
    """(correct, extracted, answer_key), math-verify with the gold parsed first."""
    gold_parsed = _parse_gold(str(gold))
    if not gold_parsed:
        raise RlvrxError(f"math-verify cannot parse the gold answer {str(gold)[:200]!r}; check the dataset's answer field")
    parsed = parse_answer(completion)
    if not parsed:
        return False, None, None
    correct = _math_verify().verify(gold_parsed, parsed, timeout_seconds=None)
    return bool(correct), extracted_text(parsed), answer_key(parsed)
