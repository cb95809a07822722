"""The one reader for JSON and JSON Lines files that users or earlier runs hand us.

Every failure is a one-line UsageError naming the file (and the line, for JSONL): not UTF-8, not
JSON, nested deeper than Python can parse, the wrong top-level type. A JSONL file whose LAST line is
cut short (a process killed mid-write: no final newline and not valid JSON) can be read without that
line (`torn_tail="drop"`, for logs this project appends to), or refused (`"error"`, for user data).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Literal

from rlvrx.errors import UsageError


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _parse(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise UsageError(f"{where}: invalid JSON: nested too deeply") from None


def read_json(path: str | os.PathLike, expect: type | None = None) -> Any:
    """The JSON document in `path`; `expect` (dict or list) checks its top-level type."""
    path = Path(path)
    value = _parse(_text(path), str(path))
    if expect is not None and not isinstance(value, expect):
        raise UsageError(f"{path}: expected a JSON {'object' if expect is dict else 'array'}, found {type(value).__name__}")
    return value


def iter_jsonl(path: str | os.PathLike, torn_tail: Literal["drop", "error"] = "error") -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file; every line must be an object."""
    path = Path(path)
    text = _text(path)
    lines = text.split("\n")
    last = len(lines) - 1 if not text.endswith("\n") else -1  # index of a line without its newline
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = _parse(line, f"{path}:{number}")
        except UsageError:
            if number - 1 == last and torn_tail == "drop":
                return
            raise
        if not isinstance(value, dict):
            raise UsageError(f"{path}:{number}: expected a JSON object per line, found {type(value).__name__}")
        yield number, value


def read_jsonl(path: str | os.PathLike, torn_tail: Literal["drop", "error"] = "error") -> list[dict]:
    return [value for _, value in iter_jsonl(path, torn_tail)]
