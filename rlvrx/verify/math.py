"""The math verifier: math-verify, with the gold answer parsed first.

`grade_math`: the gold answer is wrapped as `\\boxed{gold}` (unless it already holds a \\boxed) and
parsed first, then the completion is parsed with math-verify's default extraction (LaTeX, then plain
expressions), then `verify(gold, answer)`. math-verify joins all the \\boxed{} of a completion:
"\\boxed{3} ... \\boxed{2}" is the set {2, 3}, which equals no single gold answer (a completion that
boxes an intermediate result is wrong). Timeouts are not math-verify's (SIGALRM, main thread only)
but the caller's: rlvrx.verify.graders runs this under its own alarm in-process, and the worker pool
under a hard kill. math_verify is imported on first use, so importing this module stays cheap.

Two rules on top of math-verify, where it is more lenient than the official grader (PRM800K's
grade_answer, used by the RLVR-Linearity evaluation); they only turn an accept into a reject:
- base subscripts: a gold numeral with a base, "52_8" or "52_{8}", needs an answer with the same
  digits and the same base. math-verify drops subscripts (it accepts "52" and even "52_{10}");
  "52" is the decimal fifty-two, not 52 in base 8 (= 42), and the question asks for base 8
  notation. The official grader rejects "52" too (an integer answer must match a non-integer gold
  string for string).
- fractions: when the gold is a literal fraction (17/50, \frac{17}{50}) and the answer is one too,
  numerator and denominator must be the gold's: 34/100 is rejected for 17/50 ("express as a common
  fraction" asks for lowest terms; the official grader compares literal fractions as strings,
  "if fractions aren't reduced, then shouldn't be marked as correct"). Other forms of the same value
  (0.34) stay math-verify's call, as they are sympy's in the official grader.
"""

from __future__ import annotations

import logging
import re
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


_BASE = re.compile(r"([0-9a-z]+)_([0-9]+)")


def _compact(text: str) -> str:
    """Lower-case, without spaces, $, braces and \\text / \\mathrm wrappers (for the literal rules)."""
    text = re.sub(r"\\(?:text|mathrm|textbf)", "", text)
    return re.sub(r"[\s${}]", "", text).lower()


_LITERAL_FRACTION = re.compile(r"(-?)(?:\\[dt]?frac\{([0-9]+)\}\{([0-9]+)\}|\{?([0-9]+)\}?/\{?([0-9]+)\}?)")


def _literal_fraction(text: str) -> tuple[str, int, int] | None:
    """(sign, numerator, denominator) of a literal fraction (a/b, \\frac{a}{b}), else None."""
    m = _LITERAL_FRACTION.fullmatch(re.sub(r"[\s$]", "", text))
    if m is None:
        return None
    numerator, denominator = (m.group(2), m.group(3)) if m.group(2) is not None else (m.group(4), m.group(5))
    return m.group(1), int(numerator), int(denominator)


def official_rules(gold: str, extracted: str | None) -> str | None:
    """Why an answer math-verify accepted is still wrong under the rules above, or None."""
    text = extracted or ""
    base = _BASE.fullmatch(_compact(gold))
    if base is not None and any(c.isdigit() for c in base.group(1)) and int(base.group(2)) >= 2:
        answer = _BASE.fullmatch(_compact(text))
        if answer is None or answer.groups() != base.groups():
            return f"the gold is {base.group(1)} in base {base.group(2)}: the answer must be written with the same base subscript"
        return None
    gold_fraction = _literal_fraction(gold)
    answer_fraction = _literal_fraction(text)
    if gold_fraction is not None and answer_fraction is not None and answer_fraction != gold_fraction:
        return "a fraction must be written as the gold's (lowest terms)"
    return None


def grade_math(completion: str, gold: str) -> tuple[bool, str | None, str | None]:
    """(correct, extracted, answer_key), math-verify with the gold parsed first, then the official rules."""
    gold_parsed = _parse_gold(str(gold))
    if not gold_parsed:
        raise RlvrxError(f"math-verify cannot parse the gold answer {str(gold)[:200]!r}; check the dataset's answer field")
    parsed = parse_answer(completion)
    if not parsed:
        return False, None, None
    correct = bool(_math_verify().verify(gold_parsed, parsed, timeout_seconds=None))
    extracted = extracted_text(parsed)
    if correct and official_rules(str(gold), extracted) is not None:
        correct = False
    return correct, extracted, answer_key(parsed)
