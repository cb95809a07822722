"""Advisory file locks (fcntl.flock) for writers that share a run directory or an output.

Callers name the lock file (e.g. `RUN/.rlvrx.lock`, `OUT.lock`). Two uses: a long job holds an exclusive lock on what it writes (a training run, an eval output) and a
second job is refused at once with the holder's pid; a short read-modify-write (trajectory.json) waits
for its turn. The kernel drops a lock when its holder dies, so a killed job never leaves one behind;
the lock file itself stays (it only carries the holder's pid).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from rlvrx.errors import RlvrxError


class LockedError(RlvrxError):
    """Another process holds the lock."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return "another process"
    return f"pid {text}" if text.isdigit() else "another process"


@contextlib.contextmanager
def locked(path: str | os.PathLike, what: str, wait: bool = False) -> Iterator[None]:
    """Hold the lock file `path` (created if missing) for the block.

    wait=False: if another process holds it, raise LockedError naming `what` and the holder's pid.
    wait=True: block until it is free (for short critical sections only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise LockedError(f"{what} is in use by {_holder(fd)} (lock {path}); wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


RUN_LOCK = ".rlvrx.lock"


def run_locked(run_dir: str | os.PathLike) -> contextlib.AbstractContextManager:
    """The run directory as the calling process's alone: one trainer (native or verl) per run."""
    return locked(Path(run_dir) / RUN_LOCK, f"run directory {run_dir}")
