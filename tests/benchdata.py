"""Where the tests find the benchmark data (aime24/aime25/math500/gsm8k JSONL files).

RLVRX_TEST_DATA names the directory; by default it is ../shared/data/benchmarks next to the
repository (where CI and the workspace keep it; it is never copied into the repository). The data
is part of the test setup, so a missing file fails the test with a message saying where it was
looked for, instead of skipping it.
"""

from __future__ import annotations

import os
from pathlib import Path

TEST_DATA_ENV = "RLVRX_TEST_DATA"
BENCHMARKS = Path(os.environ.get(TEST_DATA_ENV) or Path(__file__).resolve().parents[2] / "shared/data/benchmarks")


def benchmarks_dir() -> Path:
    """BENCHMARKS, failing the calling test if it is not a directory."""
    if not BENCHMARKS.is_dir():
        raise AssertionError(f"benchmark data not found at {BENCHMARKS}; set {TEST_DATA_ENV} to its directory")
    return BENCHMARKS


def benchmark_file(name: str) -> Path:
    """BENCHMARKS/<name>.jsonl, failing the calling test if it is absent."""
    path = benchmarks_dir() / f"{name}.jsonl"
    if not path.is_file():
        raise AssertionError(f"benchmark file not found: {path}; set {TEST_DATA_ENV} to the benchmark directory")
    return path
