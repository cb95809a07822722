"""Atomic outputs: write into a temporary sibling (`OUT.tmp-HOST-PID-*`), fsync, rename into place.

A failed or interrupted writer leaves the previous output intact. Temporaries carry their writer's
host and pid, so that the next writer of the same output can clean up after a killed one (SIGKILL,
a node crash): a dead writer's `OUT.tmp-*` is removed, and a lone `OUT.old-*` (killed between the
two renames that replace an existing output) is put back. A live writer's are never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from rlvrx.errors import ParameterError, UsageError

# What marks a run directory: its trajectory manifest (rlvrx.trajectory.MANIFEST; io sits below that layer).
RUN_MANIFEST = "trajectory.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_HOST = socket.gethostname() or "host"


def _tmp_prefix(name: str, kind: str) -> str:
    """`NAME.tmp-HOST-PID-` (or `.old-`): whose temporary it is, so that a later start can tell a dead
    writer's leftovers (removed or restored) from a live one's (never touched)."""
    return f"{name}.{kind}-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def _leftovers(parent: Path, name: str, kind: str) -> Iterator[Path]:
    """`NAME.<kind>-HOST-PID-XXXXXXXX*` entries of dead processes of this host (a pid seen from
    another host says nothing, so those are left alone)."""
    pattern = re.compile(rf"^{re.escape(name)}\.{kind}-(.+)-(\d+)-[A-Za-z0-9_]{{8}}")
    try:
        children = list(parent.iterdir())
    except OSError:
        return
    for child in children:
        match = pattern.match(child.name)
        if match and match.group(1) == _HOST and not _alive(int(match.group(2))):
            yield child


def recover(out: str | os.PathLike) -> None:
    """Undo what a killed writer of `out` left: its `OUT.tmp-*` are removed, and a lone
    `OUT.old-*` (killed between atomic_dir's two renames) is put back as `out`."""
    out = Path(out)
    for tmp in _leftovers(out.parent, out.name, "tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in _leftovers(out.parent, out.name, "old"):
        kept = old / out.name
        if kept.exists() and not out.exists():
            with contextlib.suppress(FileNotFoundError):  # a concurrent recovery did it first
                os.replace(kept, out)
        shutil.rmtree(old, ignore_errors=True)


def recover_file(path: str | os.PathLike) -> None:
    """Remove the `.NAME.tmp-*` files that dead writers of `path` left."""
    path = Path(path)
    for tmp in _leftovers(path.parent, f".{path.name}", "tmp"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def check_replaceable(out: Path) -> None:
    """Refuse to replace a run directory (one that holds trajectory.json) with anything."""
    if out.is_dir() and (out / RUN_MANIFEST).exists():
        raise UsageError(f"{out} is a run directory (it holds trajectory.json); refusing to replace it: choose another output path")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to `out`, on failure remove it.

    With overwrite, an existing `out` is replaced only after the new one is complete; never a run
    directory. What a killed writer left (see `recover`) is cleaned up first.
    """
    out = Path(out)
    recover(out)
    if out.exists() and not overwrite:
        raise ParameterError("{path} already exists; pass {overwrite} to replace it (it is kept until the new one is complete)", "overwrite=True", path=out)
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out.name, "tmp"), dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700; the output should get the usual mode
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        _fsync_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out.name, "old"), dir=out.parent))
            os.replace(out, old / out.name)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / out.name, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is racy across threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_file(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(f".{path.name}", "tmp"), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file via a temporary sibling, fsync and rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
