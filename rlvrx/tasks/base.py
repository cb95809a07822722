"""What a verifiable task is: prompts with ids and gold answers, and a verifier.

Prompt text vs tokens: `format_prompt` returns text. `encode_prompt` turns it into token ids the one
way every caller should use: the text is tokenized with add_special_tokens=False, then the
tokenizer's BOS id is put in front when the task asks for it (`Task.prepend_bos`) and the tokenizer
has one. A chat template already writes its own special tokens, so math prompts rendered through a
template get no extra BOS.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from rlvrx.errors import UsageError
from rlvrx.verify.graders import grade_one
from rlvrx.verify.types import GradeItem, GradeResult

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Example:
    """id: unique within the task; prompt: the problem text (before any template); answer: the gold
    answer as a string; record: the raw source row (for provenance; not compared)."""

    id: str
    prompt: str
    answer: str
    record: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


class Task(ABC):
    """A verifiable task. Subclasses implement `examples`, `format_prompt` and either set
    `grading_kind` (a kind of rlvrx.verify.graders, so the grading pool can run the verifier) or
    override `grade`."""

    name: str = "task"
    grading_kind: str | None = None
    prepend_bos: bool = True

    @abstractmethod
    def examples(self, split: str) -> list[Example]:
        """The examples of split "train" or "test", in a fixed order."""

    def train_examples(self) -> list[Example]:
        return self.examples("train")

    def test_examples(self) -> list[Example]:
        return self.examples("test")

    @abstractmethod
    def format_prompt(self, example: Example, tokenizer=None) -> str:
        """The prompt text the model continues (see the module docstring about BOS)."""

    def encode_prompt(self, example: Example, tokenizer) -> list[int]:
        text = self.format_prompt(example, tokenizer)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = getattr(tokenizer, "bos_token_id", None)
        if self._wants_bos(tokenizer) and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def _wants_bos(self, tokenizer) -> bool:
        return self.prepend_bos

    def gold_completion(self, example: Example) -> str:
        """A correct completion, for SFT warm-up (the caller appends EOS)."""
        return example.answer

    def grade_item(self, completion: str, example: Example) -> GradeItem:
        if self.grading_kind is None:
            raise UsageError(f"task {self.name!r} has no grading_kind, so it cannot be graded in the worker pool")
        return GradeItem(completion, example.answer, self.grading_kind)

    def grade(self, completion: str, example: Example) -> GradeResult:
        """Verdict, extracted answer and status, computed in this process."""
        item = self.grade_item(completion, example)
        return grade_one(item.completion, item.gold, item.kind)

    def extract_answer(self, completion: str) -> str | None:
        """The answer the completion gives, normalised, or None when it gives none."""
        raise NotImplementedError(f"task {self.name!r} does not implement extract_answer")

    def reward(self, completion: str, example: Example) -> float:
        return 1.0 if self.grade(completion, example).correct else 0.0

    def rewards(self, completions: Sequence[str], examples: Sequence[Example], pool=None) -> list[float]:
        """Rewards for many completions; through `pool` (a GradingPool) when given."""
        if len(completions) != len(examples):
            raise ValueError(f"{len(completions)} completions for {len(examples)} examples")
        if pool is None:
            return [self.reward(c, e) for c, e in zip(completions, examples)]
        results = pool.grade([self.grade_item(c, e) for c, e in zip(completions, examples)])
        return [1.0 if r.correct else 0.0 for r in results]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; use 'train' or 'test'")
    return split
