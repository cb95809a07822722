"""Synthetic arithmetic: `07+45=` -> `52`.

Problems: two operands of exactly `digits` digits (zero-padded, 0 .. 10**digits - 1) and one of
`operators` (+ - *). The split is fixed by `seed`: problems are drawn without replacement from one
seeded stream, the first `n_test` are the test set and the next `n_train` the train set, so the
test set depends only on (digits, operators, seed, n_test) and the two sets never overlap.

Prompt: `07+45=` as plain text; `encode_prompt` puts the tokenizer's BOS id in front (the tiny
character tokenizer adds none itself). The model should answer `52` then EOS.

Verifier (the rule the reward uses):
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

import random
import re

from rlvrx.errors import UsageError
from rlvrx.tasks.base import Example, Task, check_split

OPERATORS = ("+", "-", "*")
_LEADING_INTEGER = re.compile(r"(-?)([0-9]+)(\.[0-9])?", re.ASCII)
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


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


class ArithmeticTask(Task):
    grading_kind = "arithmetic"
    prepend_bos = True

    def __init__(
        self,
        digits: int = 2,
        operators="+",
        n_train: int = 2000,
        n_test: int = 200,
        seed: int = 0,
        name: str = "arithmetic",
    ):
        if isinstance(operators, str):
            operators = list(operators)
        operators = list(operators)
        if not isinstance(digits, int) or isinstance(digits, bool) or not 1 <= digits <= 9:
            raise UsageError(f"task.digits must be an integer from 1 to 9, got {digits!r}")
        if not operators or any(op not in OPERATORS for op in operators) or len(set(operators)) != len(operators):
            raise UsageError(f"task.operators must be distinct operators from {' '.join(OPERATORS)}, got {operators!r}")
        for key, value in (("n_train", n_train), ("n_test", n_test)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"task.{key} must be a non-negative integer, got {value!r}")
        total = len(operators) * 10 ** (2 * digits)
        if n_train + n_test > total:
            raise UsageError(
                f"task: n_train + n_test = {n_train + n_test} but only {total} distinct problems exist with "
                f"{digits} digit(s) and operators {''.join(operators)}; lower them or raise task.digits"
            )
        self.name = name
        self.digits = digits
        self.operators = tuple(operators)
        self.n_train = n_train
        self.n_test = n_test
        self.seed = seed
        self._splits: dict[str, list[Example]] | None = None

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        if self._splits is None:
            self._splits = self._build()
        return list(self._splits[split])

    def _build(self) -> dict[str, list[Example]]:
        per_operator = 10 ** (2 * self.digits)
        total = per_operator * len(self.operators)
        rng = random.Random(self.seed)
        seen: set[int] = set()
        drawn: list[int] = []
        while len(drawn) < self.n_test + self.n_train:
            index = rng.randrange(total)
            if index not in seen:
                seen.add(index)
                drawn.append(index)
        made = [self._example(index, per_operator) for index in drawn]
        return {"test": made[: self.n_test], "train": made[self.n_test :]}

    def _example(self, index: int, per_operator: int) -> Example:
        operator = self.operators[index // per_operator]
        a, b = divmod(index % per_operator, 10**self.digits)
        problem = f"{a:0{self.digits}d}{operator}{b:0{self.digits}d}"
        answer = str(_APPLY[operator](a, b))
        return Example(id=problem, prompt=problem + "=", answer=answer, record={"a": a, "b": b, "op": operator})

    def format_prompt(self, example: Example, tokenizer=None) -> str:
        return example.prompt

    def extract_answer(self, completion: str) -> str | None:
        return extract_integer(completion)

    def grade(self, completion: str, example: Example):
        from rlvrx.eval.grading import GradeResult

        correct, extracted, key = grade_arithmetic(completion, example.answer)
        return GradeResult(correct, extracted, key)

    def reward(self, completion: str, example: Example) -> float:
        extracted = extract_integer(completion)
        return 1.0 if extracted is not None and extracted == canonical_integer(example.answer) else 0.0
