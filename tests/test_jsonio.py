"""rlvrx.io.jsonio: one-line errors naming file and line; a torn last line dropped only where asked."""

from __future__ import annotations

import json

import pytest

from rlvrx.errors import UsageError
from rlvrx.io.jsonio import read_json, read_jsonl


def test_jsonl_torn_tail_is_dropped_only_when_asked(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "loss": i / 3} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    assert read_jsonl(path, torn_tail="drop") == rows
    with pytest.raises(UsageError, match=r"metrics.jsonl:4: invalid JSON at line 1, column 13: Unterminated string"):
        read_jsonl(path)
    # A damaged line that is not the last one is an error either way, as is a complete bad last line.
    path.write_text('{"step": 0}\n{"step": \n{"step": 2}\n')
    with pytest.raises(UsageError, match=r"metrics.jsonl:2: invalid JSON"):
        read_jsonl(path, torn_tail="drop")
    path.write_text('{"step": 0}\n[1, 2]\n')
    with pytest.raises(UsageError, match=r"metrics.jsonl:2: expected a JSON object per line, found list"):
        read_jsonl(path, torn_tail="drop")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\xff\xfe{}", r"not UTF-8 text \(byte 0\)"),
        (b"[" * 100_000 + b"]" * 100_000, r"invalid JSON: nested too deeply"),
        (b'{"a": 1,}', r"invalid JSON at line 1, column 9: Expecting property name"),
        (b"[1, 2]", r"expected a JSON object, found list"),
    ],
)
def test_bad_json_is_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "trajectory.json"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=rf"^{path}: {message}") as err:
        read_json(path, expect=dict)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match=r"nope.json: no such file"):
        read_json(tmp_path / "nope.json")
