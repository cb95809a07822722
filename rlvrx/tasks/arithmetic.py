"""Synthetic arithmetic: `07+45=` -> `52`.

Problems: two operands of exactly `digits` digits (zero-padded, 0 .. 10**digits - 1) and one of
`operators` (+ - *). The split is fixed by `seed`: problems are drawn without replacement from one
seeded stream, the first `n_test` are the test set and the next `n_train` the train set, so the
test set depends only on (digits, operators, seed, n_test) and the two sets never overlap.

Prompt: `07+45=` as plain text; `encode_prompt` puts the tokenizer's BOS id in front (the tiny
character tokenizer adds none itself). The model should answer `52` then EOS.

Verifier: rlvrx.verify.arithmetic (the leading ASCII integer of the completion, canonical, against
the gold's; the rule the reward uses).
"""

from __future__ import annotations

import random

from rlvrx.errors import UsageError
from rlvrx.tasks.base import Example, Task, check_split
from rlvrx.verify.arithmetic import canonical_integer, extract_integer, grade_arithmetic
from rlvrx.verify.types import GradeResult

OPERATORS = ("+", "-", "*")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


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

    def grade(self, completion: str, example: Example) -> GradeResult:
        correct, extracted, key = grade_arithmetic(completion, example.answer)
        return GradeResult(correct, extracted, key)

    def reward(self, completion: str, example: Example) -> float:
        extracted = extract_integer(completion)
        return 1.0 if extracted is not None and extracted == canonical_integer(example.answer) else 0.0
