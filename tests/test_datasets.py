import json
from pathlib import Path

import pytest

from rlvrx.errors import UsageError
from rlvrx.tasks.datasets import BENCHMARKS, DATA_DIR_ENV, load_examples, read_records, resolve_data_dir

from benchdata import benchmarks_dir


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def shared():
    return benchmarks_dir()


def test_builtin_names_resolve_from_argument_and_environment(shared, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert len(load_examples("aime25", data_dir=shared)) == 30
    monkeypatch.setenv(DATA_DIR_ENV, str(shared))
    assert resolve_data_dir() == shared
    examples = load_examples("math500")
    assert len(examples) == 500
    first = examples[0]
    assert first.id == "math500-0" and first.answer == r"\left( 3, \frac{\pi}{2} \right)"
    assert first.prompt.startswith("Convert the point $(0,3)$") and first.record["source"].startswith("MATH")


def test_gsm8k_golds_are_plain_numbers(shared):
    examples = load_examples("gsm8k", data_dir=shared)
    assert len(examples) == 1319
    assert all(e.answer.lstrip("-").replace(".", "", 1).isdigit() for e in examples)


def test_missing_benchmark_says_where_it_looked_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(UsageError) as error:
        load_examples("aime24", data_dir=tmp_path, hub=False)
    message = str(error.value)
    assert str(tmp_path / "aime24.jsonl") in message
    assert DATA_DIR_ENV in message and "Point data_dir or" in message
    assert "rlvrx[data]" in message and BENCHMARKS["aime24"].repo in message
    with pytest.raises(UsageError, match=f"{DATA_DIR_ENV} is not set"):
        load_examples("math500", hub=False)


def test_any_jsonl_with_custom_keys(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"question": f"q{i}", "final": i * 2} for i in range(5)])
    examples = load_examples(path, problem_key="question", answer_key="final")
    assert [e.id for e in examples] == [f"mine-{i}" for i in range(5)]  # no id field: <stem>-<row>
    assert [e.answer for e in examples] == ["0", "2", "4", "6", "8"]
    assert examples[3].prompt == "q3" and examples[3].record == {"question": "q3", "final": 6}
    with pytest.raises(UsageError, match="no 'problem' field .*question"):
        load_examples(path)


def test_limit_and_ids(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [{"id": f"p{i}", "problem": "x", "answer": "1"} for i in range(10)])
    assert [e.id for e in load_examples(path, limit=3)] == ["p0", "p1", "p2"]
    assert [e.id for e in load_examples(path, ids=["p7", "p2"])] == ["p2", "p7"]  # dataset order
    assert [e.id for e in load_examples(path, ids="p9, p1")] == ["p1", "p9"]
    assert [e.id for e in load_examples(path, ids=["p1", "p5", "p9"], limit=2)] == ["p1", "p5"]
    with pytest.raises(UsageError, match="no problem with id p42"):
        load_examples(path, ids=["p42"])
    with pytest.raises(UsageError, match="limit"):
        load_examples(path, limit=0)


def test_bad_files(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        load_examples(tmp_path / "absent.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"problem": "a", "answer": "1"}\n{not json\n')
    with pytest.raises(UsageError, match="broken.jsonl:2"):
        load_examples(broken)
    twice = write_jsonl(tmp_path / "twice.jsonl", [{"id": 1, "problem": "a", "answer": "1"}, {"id": 1, "problem": "b", "answer": "2"}])
    with pytest.raises(UsageError, match="appears twice"):
        load_examples(twice)


def test_json_list_file(tmp_path):
    path = tmp_path / "list.json"
    path.write_text(json.dumps([{"problem": "a", "answer": 3}]))
    assert read_records(path) == [{"problem": "a", "answer": 3}]
    assert load_examples(path)[0].answer == "3"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "set.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "problem": ["p", "q"], "answer": ["1", "2"]}), path)
    assert [(e.id, e.answer) for e in load_examples(path)] == [("a", "1"), ("b", "2")]
