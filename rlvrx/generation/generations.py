"""Generations files: the JSONL format `rlvrx eval --generations FILE` grades, and eval's result files.

One JSON object per line, one line per problem:

    {"id": "p-3", "prompt": "<problem text>", "gold": "\\frac{1}{2}", "completions": ["...", ...]}

Any other fields are kept (for provenance) and ignored by grading. Readers also accept "answer" for
"gold" (dataset-style rows). Eval's result files (`<out>/<model>/<task>.jsonl`) are the same records
with per-sample grading lists added (see `GRADED_FIELDS`), so a result file is itself a valid
generations file.

Writers: `write_generations` writes a whole file atomically (for tools that produce all completions
at once, e.g. `rlvrx extrapolate logits`); `ResultsFile` appends one flushed line per finished
problem and, on reopening, drops a last line cut short by a kill.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from rlvrx.errors import ParameterError, UsageError

__all__ = [
    "GRADED_FIELDS",
    "GenerationRecord",
    "generation_record",
    "graded_record",
    "group_generations",
    "write_generations",
    "read_generations",
    "read_jsonl_records",
    "ResultsFile",
]

GOLD_KEYS = ("gold", "answer")
# Per-sample lists a graded record carries, each as long as "completions".
GRADED_FIELDS = ("correct", "extracted", "answer_key", "status", "error")


@dataclass
class GenerationRecord:
    """One problem and its sampled completions; `extra` holds any other fields of the line."""

    id: str
    prompt: str
    gold: str
    completions: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        return generation_record(self.id, self.prompt, self.gold, self.completions, **self.extra)


def generation_record(id: str, prompt: str, gold: str, completions: Sequence[str], **extra: Any) -> dict:
    """The JSON object of one line (fields id, prompt, gold, completions first, then `extra`)."""
    return {"id": str(id), "prompt": str(prompt), "gold": str(gold), "completions": [str(c) for c in completions], **extra}


def group_generations(generations: Iterable, problems: int) -> tuple[list[list[str]], list[dict]]:
    """Sampled Generations (rlvrx.generation.Generation, any order within a problem) -> per problem
    its completions and {"finish_reason": [...], "num_tokens": [...]}, in sample order."""
    completions: list[list[str]] = [[] for _ in range(problems)]
    extras: list[dict] = [{"finish_reason": [], "num_tokens": []} for _ in range(problems)]
    for g in generations:
        completions[g.prompt_index].append(g.text or "")
        extras[g.prompt_index]["finish_reason"].append(g.finish_reason)
        extras[g.prompt_index]["num_tokens"].append(len(g.token_ids))
    return completions, extras


def graded_record(example, completions: Sequence[str], results: Sequence, extra: dict) -> dict:
    """The line of one graded problem (an Example with id, prompt, answer): its completions with one
    entry per sample in each of GRADED_FIELDS, from the GradeResults, then `extra`."""
    return generation_record(
        example.id,
        example.prompt,
        example.answer,
        completions,
        correct=[bool(r.correct) for r in results],
        extracted=[r.extracted for r in results],
        answer_key=[r.answer_key for r in results],
        status=[r.status for r in results],
        error=[r.error for r in results],
        **extra,
    )


def dumps(record: dict) -> str:
    return json.dumps(record) + "\n"


def write_generations(path: str | os.PathLike, records: Iterable[dict | GenerationRecord]) -> Path:
    """Write a whole generations file atomically (records: dicts from `generation_record` or GenerationRecords)."""
    from rlvrx.io.atomic import atomic_write_text

    lines = [dumps(r.to_json() if isinstance(r, GenerationRecord) else r) for r in records]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(lines))
    return path


def read_jsonl_records(path: str | os.PathLike, allow_partial_last: bool = False) -> tuple[list[dict], int]:
    """(records, bytes of complete lines), read with rlvrx.io.jsonio (one-line errors for text that is
    not UTF-8, not JSON or nested too deeply). With allow_partial_last, a last line without its
    newline (a write cut short by a kill) is left out instead of being an error."""
    from rlvrx.io.jsonio import iter_jsonl

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    good_end = len(data)
    if allow_partial_last and data and not data.endswith(b"\n"):
        good_end = data.rfind(b"\n") + 1
    complete_lines = data[:good_end].count(b"\n") if allow_partial_last else None
    records = [
        record for number, record in iter_jsonl(path, torn_tail="drop" if allow_partial_last else "error") if complete_lines is None or number <= complete_lines
    ]
    return records, good_end


def parse_generation(raw: dict, where: str, gold_key: str | None = None) -> GenerationRecord:
    """Check one line's fields and turn it into a GenerationRecord."""
    if raw.get("id") is None:
        raise UsageError(f"{where}: no 'id' field; every line needs id, prompt, gold (or answer) and completions")
    keys = (gold_key,) if gold_key else GOLD_KEYS
    gold_field = next((k for k in keys if raw.get(k) is not None), None)
    if gold_field is None:
        raise ParameterError(
            "{where}: no gold answer field ({keys}); set {gold_key} to its name", "gold_key", where=where, keys=" or ".join(repr(k) for k in keys)
        )
    completions = raw.get("completions")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise UsageError(f"{where}: 'completions' must be a list of strings")
    if not completions:
        raise UsageError(f"{where}: 'completions' is empty; a problem needs at least one completion to grade")
    extra = {k: v for k, v in raw.items() if k not in ("id", "prompt", "completions", gold_field) and k not in GRADED_FIELDS}
    return GenerationRecord(str(raw["id"]), str(raw.get("prompt", "")), str(raw[gold_field]).strip(), list(completions), extra)


def read_generations(path: str | os.PathLike, gold_key: str | None = None) -> list[GenerationRecord]:
    """All records of a generations file, checked: ids unique, completions a non-empty list of strings."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such generations file")
    raw_records, _ = read_jsonl_records(path)
    if not raw_records:
        raise UsageError(f"{path}: no records; expected one JSON object per line with id, prompt, gold, completions")
    records, seen = [], set()
    for number, raw in enumerate(raw_records, 1):
        record = parse_generation(raw, f"{path} record {number}", gold_key)
        if record.id in seen:
            raise UsageError(f"{path}: id {record.id!r} appears twice; ids must be unique")
        seen.add(record.id)
        records.append(record)
    return records


def check_graded(record: dict, where: str) -> dict:
    """A graded record's per-sample lists exist and match its completions."""
    completions = record.get("completions")
    if not isinstance(completions, list) or not completions:
        raise UsageError(f"{where}: no completions")
    for key in GRADED_FIELDS:
        values = record.get(key)
        if not isinstance(values, list) or len(values) != len(completions):
            raise UsageError(f"{where}: '{key}' must be a list with one entry per completion; is this an rlvrx eval result file?")
    return record


class ResultsFile:
    """An eval result file: graded records, one line per finished problem, appended as they finish.

    `open()` reads the finished records (dropping, and truncating away, a last line cut short by a
    kill) and keeps the file open for appending; `append` writes one line and flushes it, so a killed
    run loses at most the problems it had not finished.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.finished: dict[str, dict] = {}
        self.dropped_partial = False
        self._handle = None

    def open(self, fresh: bool = False) -> "ResultsFile":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()
        if self.path.exists():
            records, good_end = read_jsonl_records(self.path, allow_partial_last=True)
            if good_end != self.path.stat().st_size:
                self.dropped_partial = True
                with open(self.path, "r+b") as handle:
                    handle.truncate(good_end)
            for number, record in enumerate(records, 1):
                where = f"{self.path} record {number}"
                if record.get("id") is None:
                    raise UsageError(f"{where}: no 'id' field")
                check_graded(record, where)
                self.finished.setdefault(str(record["id"]), record)
        self._handle = open(self.path, "a", encoding="utf-8")
        return self

    def append(self, record: dict) -> None:
        self._handle.write(dumps(record))
        self._handle.flush()
        self.finished[str(record["id"])] = record

    def sync(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self.sync()
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "ResultsFile":
        return self.open() if self._handle is None else self

    def __exit__(self, *exc) -> None:
        self.close()
