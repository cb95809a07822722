"""What identifies a checkpoint's weights: its weight files, their full sha256, a cheap fingerprint,
and whether two checkpoints have the same structure."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, Sequence

from rlvrx.io.reader import INDEX_NAME, Checkpoint


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The weight files (and index) of a checkpoint directory, in name order: what identifies its weights."""
    return sorted(p for p in Path(path).iterdir() if p.name.endswith(".safetensors") or p.name == INDEX_NAME)


def checkpoint_sha256(path: str | os.PathLike, stop=None) -> str:
    """sha256 over the weight files (and index) of a checkpoint, in name order. With `stop` (a
    threading.Event), gives up between blocks once it is set (concurrent.futures.CancelledError)."""
    digest = hashlib.sha256()
    for file in weight_files(path):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                if stop is not None and stop.is_set():
                    raise CancelledError
                digest.update(block)
    return digest.hexdigest()


def compare_structure(a: Checkpoint, b: Checkpoint) -> str | None:
    """None when both hold the same tensor names, shapes and dtypes, else a line naming the first difference
    (and how many more there are)."""
    ia, ib = a.infos(), b.infos()
    diffs = [f"tensor {name} is in {a.path} but not in {b.path}" for name in ia if name not in ib]
    diffs += [f"tensor {name} is in {b.path} but not in {a.path}" for name in ib if name not in ia]
    for name, info in ia.items():
        other = ib.get(name)
        if other is None:
            continue
        if info.shape != other.shape:
            diffs.append(f"tensor {name} has shape {list(info.shape)} in {a.path} but {list(other.shape)} in {b.path}")
        elif info.dtype_name != other.dtype_name:
            diffs.append(f"tensor {name} has dtype {info.dtype_name} in {a.path} but {other.dtype_name} in {b.path}")
    if not diffs:
        return None
    return diffs[0] + (f" (and {len(diffs) - 1} more difference(s))" if len(diffs) > 1 else "")


FINGERPRINT_BLOCKS = 16  # 4 KiB blocks sampled evenly from each weight file's data


def input_fingerprint(path: str | os.PathLike) -> dict:
    """A cheap identity of a checkpoint's weights (about 64 KiB read per file, not 1 GB): total
    bytes, newest mtime, and sha256 over each weight file's name, size, safetensors header (tensor
    names, dtypes, shapes, offsets) and FINGERPRINT_BLOCKS evenly spaced 4 KiB blocks of its data.
    Two checkpoints of one model differ in it; a full sha256 (--hash, or the trajectory manifest's)
    also catches an edit that misses every sampled block."""
    digest = hashlib.sha256()
    total, newest = 0, 0
    files = weight_files(path)
    for file in files:
        stat = file.stat()
        total += stat.st_size
        newest = max(newest, stat.st_mtime_ns)
        digest.update(f"{file.name}\0{stat.st_size}\0".encode())
        with open(file, "rb") as f:
            if file.name == INDEX_NAME:
                digest.update(f.read())
                continue
            head = f.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else 0
            digest.update(head + f.read(min(size, 100 << 20)))
            data_start = 8 + size
            span = max(0, stat.st_size - data_start - 4096)
            for k in range(FINGERPRINT_BLOCKS):
                digest.update(os.pread(f.fileno(), 4096, data_start + span * k // max(1, FINGERPRINT_BLOCKS - 1)))
    modified = _dt.datetime.fromtimestamp(newest / 1e9, _dt.timezone.utc).isoformat(timespec="seconds") if files else None
    return {"bytes": total, "modified": modified, "fingerprint": digest.hexdigest()}


class HashedInput(Protocol):
    """A checkpoint to hash: its directory, and its sha256 where already known."""

    path: Path
    sha256: str | None


class InputHashes:
    """sha256 of the inputs without a known hash, on a worker thread (hashlib releases the GIL);
    `futures[k]` is None where the hash is known or hashing is off."""

    def __init__(self, sources: Sequence[HashedInput], enabled: bool):
        import threading

        self.stop = threading.Event()
        self.pool: ThreadPoolExecutor | None = None
        self.futures: list[Future | None] = [None] * len(sources)
        if enabled and not all(s.sha256 for s in sources):
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlvrx-hash")
            self.futures = [None if s.sha256 else self.pool.submit(checkpoint_sha256, s.path, self.stop) for s in sources]

    def close(self) -> None:
        if self.pool is not None:
            self.stop.set()
            self.pool.shutdown(wait=True, cancel_futures=True)
