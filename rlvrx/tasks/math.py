"""Math problems graded with math-verify.

Rows come from a JSONL/parquet file or a built-in benchmark name (see rlvrx.eval.datasets). The
prompt is `"{problem} Let's think step by step and output the final answer within \\boxed{}."`,
rendered through the tokenizer's chat template (one user turn, generation prompt added) when it has
one; otherwise that text as is, with BOS put in front by `encode_prompt`.

Grading (`grade_math`): the gold answer is wrapped as `\\boxed{gold}` (unless it already holds a
\\boxed) and parsed first, then the completion is parsed with math-verify's default extraction
(LaTeX, then plain expressions), then `verify(gold, answer)`. math-verify joins all the
\\boxed{} of a completion: "\\boxed{3} ... \\boxed{2}" is the set {2, 3}, which equals no single
gold answer (a completion that boxes an intermediate result is wrong). Timeouts are
not math-verify's (SIGALRM, main thread only) but the caller's: rlvrx.eval.grading runs this under
its own alarm in-process, and under a hard kill in the worker pool. math_verify is imported on
first use, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from rlvrx.errors import RlvrxError, UsageError
from rlvrx.tasks.base import Example, Task, check_split

INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


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
        self.load_options = dict(
            data_dir=data_dir, problem_key=problem_key, answer_key=answer_key, id_key=id_key, limit=limit, ids=ids
        )
        self.instruction = instruction
        self._cache: dict[str, list[Example]] = {}

    def examples(self, split: str) -> list[Example]:
        check_split(split)
        source = self.sources[split]
        if source is None:
            raise UsageError(f"task {self.name!r} has no training data; set task.data")
        if split not in self._cache:
            from rlvrx.eval.datasets import load_examples

            self._cache[split] = load_examples(source, **self.load_options)
        return list(self._cache[split])

    def user_message(self, example: Example) -> str:
        return f"{example.prompt} {self.instruction}".strip() if self.instruction else example.prompt

    def format_prompt(self, example: Example, tokenizer=None) -> str:
        content = self.user_message(example)
        if _has_chat_template(tokenizer):
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        return content

    def _wants_bos(self, tokenizer) -> bool:
        return not _has_chat_template(tokenizer)

    def gold_completion(self, example: Example) -> str:
        solution = str(example.record.get("solution") or "")
        return solution if "\\boxed" in solution else f"The answer is \\boxed{{{example.answer}}}."

    def extract_answer(self, completion: str) -> str | None:
        """math-verify's extracted answer (in-process, under grade_one's SIGALRM timeout)."""
        from rlvrx.eval.grading import DEFAULT_TIMEOUT, _grade_guarded

        def extract(text: str, _gold: str):
            return False, extracted_text(parse_answer(text)), None

        return _grade_guarded(extract, completion, "", DEFAULT_TIMEOUT).extracted
