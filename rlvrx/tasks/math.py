"""Math problems graded with math-verify.

Rows come from a JSONL/parquet file or a built-in benchmark name (see rlvrx.tasks.datasets). The
prompt is `"{problem} Let's think step by step and output the final answer within \\boxed{}."`,
rendered through the tokenizer's chat template (one user turn, generation prompt added) when it has
one; otherwise that text as is, with BOS put in front by `encode_prompt`.

Grading: rlvrx.verify.math (math-verify, gold parsed first), kind "math".
"""

from __future__ import annotations

from rlvrx.errors import UsageError
from rlvrx.tasks.base import Example, Task, check_split
from rlvrx.tasks.datasets import load_examples
from rlvrx.verify.graders import DEFAULT_TIMEOUT, grade_guarded
from rlvrx.verify.math import extracted_text, parse_answer

INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def _has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


class MathTask(Task):
    """Options: data (train rows: a JSONL/parquet path or aime24|aime25|math500|gsm8k), test_data
    (eval rows; default: data), data_dir, problem_key, answer_key, id_key, limit, ids, instruction."""

    grading_kind = "math"

    def __init__(
        self,
        data: str | None = None,
        test_data: str | None = None,
        data_dir: str | None = None,
        problem_key: str = "problem",
        answer_key: str = "answer",
        id_key: str = "id",
        limit: int | None = None,
        ids=None,
        instruction: str = INSTRUCTION,
        name: str = "math",
    ):
        if data is None and test_data is None:
            raise UsageError(
                f"task {name!r} needs task.data: a JSONL/parquet file with '{problem_key}' and '{answer_key}' "
                "fields, or a benchmark name (aime24, aime25, math500, gsm8k)"
            )
        self.name = name
        self.sources = {"train": data, "test": test_data if test_data is not None else data}
        self.load_options = dict(data_dir=data_dir, problem_key=problem_key, answer_key=answer_key, id_key=id_key, limit=limit, ids=ids)
        self.instruction = instruction
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        source = self.sources[split]
        if source is None:
            raise UsageError(f"task {self.name!r} has no training data; set task.data")
        if split not in self._cache:
            self._cache[split] = load_examples(source, **self.load_options)
        return list(self._cache[split])

    def user_message(self, example: Example) -> str:
        return f"{example.prompt} {self.instruction}".strip() if self.instruction else example.prompt

    def format_prompt(self, example: Example, tokenizer=None) -> str:
        content = self.user_message(example)
        if _has_chat_template(tokenizer):
            return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        return content

    def _wants_bos(self, tokenizer) -> bool:
        return not _has_chat_template(tokenizer)

    def gold_completion(self, example: Example) -> str:
        solution = str(example.record.get("solution") or "")
        return solution if "\\boxed" in solution else f"The answer is \\boxed{{{example.answer}}}."

    def extract_answer(self, completion: str) -> str | None:
        """math-verify's extracted answer (in-process, under grade_guarded's SIGALRM timeout)."""

        def extract(text: str, _gold: str):
            return False, extracted_text(parse_answer(text)), None

        return grade_guarded(extract, completion, "", DEFAULT_TIMEOUT).extracted
