"""Parsers of option values shared by the commands (`--window A:B`, `--shard I/N`, sizes, `--k-list`).

Each turns a flag's text into the value the library takes, or a one-line UsageError naming the flag.
"""

from __future__ import annotations

from typing import Sequence

from rlvrx.errors import UsageError

__all__ = ["parse_k_list", "parse_shard", "parse_size", "parse_window"]


def parse_window(text: str | None) -> tuple[int, int] | None:
    """'A:B' (inclusive; either side may be empty: '100:' is every step from 100) -> (A, B); None stays None."""
    if text is None:
        return None
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        a = int(lo) if lo.strip() else 0
        b = int(hi) if hi.strip() else 2**62
    except ValueError:
        raise UsageError(f"--window {text!r}: expected A:B with integer steps (inclusive), e.g. 100:400 (or 100: for all from 100)") from None
    if a > b:
        raise UsageError(f"--window {text!r}: start {a} is after end {b}")
    return a, b


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' (0-based I) -> (I, N)."""
    index, sep, count = text.partition("/")
    if not sep or not index.strip().isdigit() or not count.strip().isdigit():
        raise UsageError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    i, n = int(index), int(count)
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: the index is 0-based, so I must be in 0..{max(n - 1, 0)}")
    return i, n


def parse_size(text: str) -> int:
    """'500MB', '2GiB', '5GB', '1000000' -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGTIB")
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise UsageError(f"size {text!r}: expected a positive number with an optional unit, e.g. 5GB, 500MB, 2GiB")
    return int(value * units[unit])


def parse_k_list(text: str | Sequence[int] | None) -> list[int] | None:
    """--k-list '1,4,16' -> [1, 4, 16] (sorted, unique); None stays None (= default_k_list per n)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(p) for p in text]
    try:
        ks = sorted({int(p) for p in parts if p})
    except ValueError:
        raise UsageError(f"--k-list {text!r}: expected comma-separated positive integers, e.g. 1,4,16") from None
    if not ks or ks[0] < 1:
        raise UsageError(f"--k-list {text!r}: expected comma-separated positive integers, e.g. 1,4,16")
    return ks


LOGGER_HELP = (
    "Trackers, comma-separated: console, tensorboard (RUN/tensorboard), mlflow ($MLFLOW_TRACKING_URI, else RUN/mlflow.db),"
    " wandb (offline in RUN/wandb unless WANDB_MODE or WANDB_API_KEY is set), trackio (RUN/trackio); the recipe key `logger`."
    " A resumed run continues the same tracker run. metrics.jsonl is always written."
)


def logger_override(text: str | None) -> list[str]:
    """--logger 'tensorboard,mlflow' -> ['logger=[tensorboard, mlflow]'] (a recipe override), [] without it."""
    if text is None:
        return []
    from rlvrx.train.tracking import LOGGERS

    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in LOGGERS]
    if not names or unknown:
        raise UsageError(f"--logger {text!r}: expected comma-separated names from {', '.join(LOGGERS)}")
    return [f"logger=[{', '.join(dict.fromkeys(names))}]"]
