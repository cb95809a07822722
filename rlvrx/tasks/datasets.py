"""Problem sets: built-in benchmark names or any JSONL/parquet file.

A built-in name (aime24, aime25, math500, gsm8k) resolves to `<data_dir>/<name>.jsonl`, where
data_dir is the `data_dir` argument, else $RLVRX_DATA_DIR. When that file is missing and the
`datasets` package is installed (`pip install 'rlvrx[data]'`), the set is loaded from the Hugging
Face hub instead (needs a network); otherwise a UsageError says where we looked. Anything else is a
path to a .jsonl / .parquet file whose rows have problem/answer (and optionally id) fields.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from rlvrx.errors import ParameterError, UsageError
from rlvrx.tasks.base import Example

DATA_DIR_ENV = "RLVRX_DATA_DIR"


@dataclass(frozen=True)
class HubSource:
    repo: str
    config: str | None
    split: str


BENCHMARKS: dict[str, HubSource] = {
    "aime24": HubSource("HuggingFaceH4/aime_2024", None, "train"),
    "aime25": HubSource("yentinglin/aime_2025", None, "train"),
    "math500": HubSource("HuggingFaceH4/MATH-500", None, "test"),
    "gsm8k": HubSource("openai/gsm8k", "main", "test"),
}


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else None


def read_records(path: str | os.PathLike) -> list[dict]:
    """Rows of a .jsonl (or .json list) / .parquet file; an empty or unreadable file is a one-line UsageError."""
    from rlvrx.io.jsonio import read_json, read_jsonl

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise UsageError(f"{path}: reading parquet needs pyarrow (pip install 'rlvrx[data]')") from e
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow's ArrowInvalid / OSError for a damaged file
            raise UsageError(f"{path}: not a readable parquet file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    elif suffix == ".json" and path.read_bytes().lstrip().startswith(b"["):
        rows = read_json(path, expect=list)
    else:
        rows = read_jsonl(path)
    if not rows:
        raise UsageError(f"{path}: no rows; expected one JSON object per line with problem and answer fields")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise UsageError(f"{path}: row {number} is not a JSON object")
    return rows


def records_to_examples(rows: list[dict], source: str, problem_key: str = "problem", answer_key: str = "answer", id_key: str | None = "id") -> list[Example]:
    """Rows -> Examples; ids from `id_key` when the rows have it, else `<source>-<row index>`."""
    examples, seen = [], set()
    stem = Path(source).stem if source not in BENCHMARKS else source
    for index, row in enumerate(rows):
        for key in (problem_key, answer_key):
            if row.get(key) is None:
                have = ", ".join(sorted(row)) or "none"
                raise UsageError(
                    f"{source}: row {index + 1} has no '{key}' field (fields: {have}); set the problem/answer key options to the right field names"
                )
        raw_id = row.get(id_key) if id_key else None
        example_id = str(raw_id) if raw_id is not None else f"{stem}-{index}"
        if example_id in seen:
            raise UsageError(f"{source}: id {example_id!r} appears twice (field '{id_key}'); ids must be unique")
        seen.add(example_id)
        examples.append(Example(id=example_id, prompt=str(row[problem_key]), answer=str(row[answer_key]).strip(), record=row))
    return examples


def select_examples(examples: list[Example], limit: int | None = None, ids: Iterable[str] | None = None, source: str = "") -> list[Example]:
    """Keep the given ids (in dataset order), then the first `limit`."""
    if ids is not None:
        if isinstance(ids, str):
            ids = [part.strip() for part in ids.split(",") if part.strip()]
        wanted = {str(i) for i in ids}
        missing = sorted(wanted - {e.id for e in examples})
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            sample = ", ".join(e.id for e in examples[:3])
            raise UsageError(f"{source}: no problem with id {shown} (ids look like: {sample})")
        examples = [e for e in examples if e.id in wanted]
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise UsageError(f"limit must be a positive integer, got {limit!r}")
        examples = examples[:limit]
    return examples


def load_examples(
    source: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    problem_key: str = "problem",
    answer_key: str = "answer",
    id_key: str | None = "id",
    limit: int | None = None,
    ids: Iterable[str] | None = None,
    hub: bool | None = None,
) -> list[Example]:
    """A benchmark name or a JSONL/parquet path -> Examples (limit/ids applied).

    hub: None = use the hub only when the local file is missing and `datasets` is installed;
    True = always the hub; False = never.
    """
    source = str(source)
    if source in BENCHMARKS:
        path = _benchmark_path(source, data_dir)
        if hub is not True and path is not None and path.is_file():
            rows = read_records(path)
        elif hub is not False and (hub or _datasets_installed()):
            rows = load_hub_rows(source)
            problem_key, answer_key, id_key = "problem", "answer", "id"
        else:
            raise _missing_benchmark(source, path)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            names = ", ".join(BENCHMARKS)
            raise UsageError(f"{source}: no such file, and not a built-in data set ({names})")
        rows = read_records(path)
    examples = records_to_examples(rows, source, problem_key, answer_key, id_key)
    return select_examples(examples, limit=limit, ids=ids, source=source)


def _benchmark_path(name: str, data_dir) -> Path | None:
    directory = resolve_data_dir(data_dir)
    return directory / f"{name}.jsonl" if directory is not None else None


def _missing_benchmark(name: str, path: Path | None) -> ParameterError:
    where = "looked for {path}" if path is not None else "no data directory given ({data_dir}) and ${env} is not set"
    return ParameterError(
        "benchmark '{name}': " + where + ". Point {data_dir} or ${env} at a directory holding {name}.jsonl "
        "(rows with problem/answer fields), or, with a network, pip install 'rlvrx[data]' to load "
        "{repo} from the Hugging Face hub",
        "data_dir",
        name=name,
        path=path,
        env=DATA_DIR_ENV,
        repo=BENCHMARKS[name].repo,
    )


def _datasets_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("datasets") is not None


def load_hub_rows(name: str) -> list[dict]:
    """Rows {id, problem, answer, solution, source} of a built-in benchmark from the HF hub.
    Ids are `<name>-<row index>` (`<name>-<id>` for AIME), the scheme of the local files."""
    spec = BENCHMARKS[name]
    try:
        import datasets
    except ImportError as e:
        raise UsageError(f"benchmark '{name}' from the hub needs the datasets package: pip install 'rlvrx[data]'") from e
    try:
        table = datasets.load_dataset(spec.repo, spec.config, split=spec.split)
    except Exception as e:
        raise UsageError(f"benchmark '{name}': could not load {spec.repo} from the Hugging Face hub ({e})") from e
    rows = []
    for index, row in enumerate(table):
        problem = row.get("problem", row.get("question"))
        answer = str(row.get("answer", ""))
        if name == "gsm8k":  # "...reasoning...\n#### 72"
            solution, _, answer = answer.rpartition("####")
            answer = answer.strip().replace(",", "")
        else:
            solution = row.get("solution", "")
        raw_id = row.get("id", index) if name.startswith("aime") else index  # as in the local files
        rows.append({"id": f"{name}-{raw_id}", "problem": problem, "answer": answer.strip(), "solution": solution, "source": spec.repo})
    return rows
