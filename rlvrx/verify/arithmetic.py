"""The arithmetic verifier: the leading integer of a completion against the gold integer.

The rule (the one the reward uses):
  - leading whitespace is skipped; then the answer is the maximal run of ASCII digits [0-9],
    optionally preceded by '-' ("-3" -> -3), that starts the completion;
  - it ends at the first character that is not a digit: EOS text, whitespace or any other text
    ("52<eos>", "52 ", "52abc" -> 52; "5 2" -> 5);
  - a run followed by '.' and a digit is a decimal, not an integer answer: "52.0" -> None;
  - leading zeros are fine ("052" -> 52, "-0" -> 0); '+' signs, "- 3", "−3" (U+2212) and digits of
    other scripts ("５２", "٥٢") are not integers here -> None. int() would accept the last ones;
    the vocabulary the model writes in is ASCII, and a lenient parser invites reward hacking;
  - nothing found ("", "abc") -> None, which is wrong.
The extracted answer is the canonical integer string ("52", "-3"); correct iff it equals the gold's.
No int() on the model's digits, so a 10,000-digit completion costs nothing.
"""

from __future__ import annotations

import re

_LEADING_INTEGER = re.compile(r"(-?)([0-9]+)(\.[0-9])?", re.ASCII)


def extract_integer(completion: str) -> str | None:
    """The leading integer of a completion, canonical (no leading zeros, no "-0"), or None."""
    match = _LEADING_INTEGER.match(completion.lstrip())
    if match is None or match.group(3):
        return None
    digits = match.group(2).lstrip("0") or "0"
    return digits if digits == "0" or not match.group(1) else "-" + digits


def canonical_integer(gold) -> str:
    return str(int(str(gold).strip()))


def grade_arithmetic(completion: str, gold: str) -> tuple[bool, str | None, str | None]:
    """(correct, extracted, answer_key) for the grading pool."""
    extracted = extract_integer(completion)
    return extracted is not None and extracted == canonical_integer(gold), extracted, extracted
