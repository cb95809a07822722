"""The grading pool: items graded in worker processes (rlvrx.verify.worker) with a hard per-item timeout.

Why worker processes: a grader stuck in C code that never checks for signals cannot be interrupted
in-process, and SIGALRM works in the main thread only (see rlvrx.verify.graders). The parent sends
items in small batches over a pipe and the worker answers each as it is graded; if the answer for an
item does not come within `timeout` seconds of the previous one, the parent kills the worker, marks
the item wrong with status "timeout", and gives the rest of that worker's batch to a new worker.
Inside the worker a SIGALRM soft timeout at 0.8 * timeout stops graders stuck in Python code without
the cost of a restart. A pool is not thread-safe: one caller at a time.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
import weakref
from collections import deque
from typing import Callable, Iterable, Iterator

from rlvrx.errors import RlvrxError, UsageError
from rlvrx.verify.graders import DEFAULT_TIMEOUT, check_kind, load_grader
from rlvrx.verify.types import GradeItem, GradeResult
from rlvrx.verify.worker import WORKER_COMMAND

SOFT_TIMEOUT_FRACTION = 0.8
STARTUP_TIMEOUT = 120.0


def default_workers() -> int:
    """min(4, usable CPUs)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


# Items go to workers in batches: a worker holds up to CHUNK items and gets the next batch when fewer
# than REFILL_AT are left, so it never waits for the parent between items. Items with the same
# (gold, kind) go to the same worker where possible, so its caches (the parsed gold, math-verify's
# and sympy's) serve them all, as in one process. The hard timeout stays per item: the worker
# replies after each item, and the item at the head of its queue must be answered within `timeout`
# of the previous reply (or of the batch reaching an idle worker); if not, the worker is killed,
# that item is a timeout and the rest of its queue goes to the replacement.

CHUNK = 32
REFILL_AT = 16
COALESCE = 0.005  # after a reply, let more replies gather before reading again: fewer wake-ups


class _Worker:
    def __init__(self, kinds: list[str], soft_timeout: float):
        env = dict(os.environ)
        # The worker must import what we import: rlvrx itself and any dotted grader module.
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER_COMMAND, f"{soft_timeout:.3f}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None  # both are pipes
        self.stdin, self.stdout = stdin, stdout
        self.fd = stdout.fileno()
        self.in_fd = stdin.fileno()
        os.set_blocking(self.in_fd, False)  # a stuck worker must never block the parent
        self.buffer = bytearray()
        self.outbox = bytearray()
        self.kinds = set(kinds)
        self.state = "starting"  # starting -> ready; "stale" after an interrupted call
        self.loads_pending = 0
        self.sent: deque[int] = deque()  # items sent, verdict not back yet, in the worker's order
        self.lane: deque[int] = deque()  # items assigned to this worker, not sent yet
        self.deadline = 0.0
        self.load(self.kinds)

    def load(self, kinds) -> None:
        self.kinds |= set(kinds)
        self.state = "starting"
        self.loads_pending += 1
        self.deadline = time.monotonic() + STARTUP_TIMEOUT
        self.send({"load": sorted(self.kinds)})

    def send(self, message) -> None:
        self.outbox += (json.dumps(message) + "\n").encode("utf-8")
        self.flush()

    def flush(self) -> None:
        """Write what the pipe takes now; the rest when select says it is writable. A dead worker's
        messages are dropped (its end of file or its deadline tells the parent)."""
        try:
            while self.outbox:
                del self.outbox[: os.write(self.in_fd, self.outbox)]
        except BlockingIOError:
            pass
        except OSError:
            self.outbox.clear()

    def read_lines(self) -> list | None:
        """The complete lines now available; None at end of file (the worker died)."""
        chunk = os.read(self.fd, 1 << 16)
        if not chunk:
            return None
        self.buffer.extend(chunk)
        lines = []
        while (end := self.buffer.find(b"\n")) >= 0:
            lines.append(json.loads(self.buffer[:end]))
            del self.buffer[: end + 1]
        return lines

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.stdin, self.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def close(self, grace: float = 2.0) -> None:
        try:
            self.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.kill()


class _Groups:
    """Item indices not yet given to a worker, grouped by (gold, kind), groups in order of first
    appearance; `count` is how many items they hold."""

    def __init__(self, items: list[GradeItem]):
        by_key: dict[tuple[str, str], list[int]] = {}
        for index, item in enumerate(items):
            by_key.setdefault((str(item.gold), item.kind), []).append(index)
        self.queue = deque(by_key.values())
        self.count = len(items)

    def take(self) -> list[int]:
        group = self.queue.popleft()
        self.count -= len(group)
        return group


class GradingPool:
    """A pool of grading worker processes with a hard per-item timeout. Workers start lazily (only as
    many as there are items), stay up between calls, and stop on `close()` / leaving a `with` block.

    >>> with GradingPool(workers=2, timeout=10) as pool:
    ...     results = pool.grade([("\\\\boxed{1/2}", "0.5", "math"), ("52", "52", "arithmetic")])
    """

    def __init__(self, workers: int | None = None, timeout: float = DEFAULT_TIMEOUT):
        workers = default_workers() if workers is None else workers
        if not isinstance(workers, int) or workers < 1:
            raise UsageError(f"grading workers must be a positive integer, got {workers!r}")
        if not timeout or timeout <= 0:
            raise UsageError(f"grading timeout must be > 0 seconds, got {timeout!r}")
        self.workers = workers
        self.timeout = float(timeout)
        self.restarts = 0  # workers replaced after a timeout or a crash, over the pool's life
        self._pool: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._pool)

    def __enter__(self) -> "GradingPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for worker in self._pool:
            worker.close()
        self._pool.clear()

    def grade(self, items: Iterable, on_result: Callable[[int, GradeResult], None] | None = None) -> list[GradeResult]:
        """Grade all items; results in input order. `on_result(index, result)` as each finishes."""
        items = list(items)
        results: list[GradeResult | None] = [None] * len(items)
        for index, result in self.imap_unordered(items):
            results[index] = result
            if on_result is not None:
                on_result(index, result)
        return results  # type: ignore[return-value]

    def imap_unordered(self, items: Iterable) -> Iterator[tuple[int, GradeResult]]:
        """Yield (index, result) as items finish. Items are GradeItem or (completion, gold[, kind])."""
        items = [GradeItem(*item) if not isinstance(item, GradeItem) else item for item in items]
        if not items:
            return
        kinds = sorted({item.kind for item in items})
        for kind in kinds:
            check_kind(kind)
        if any(":" in kind for kind in kinds):  # fail fast, in the caller, on a bad dotted path
            for kind in kinds:
                if ":" in kind:
                    load_grader(kind)

        soft_timeout = max(0.05, self.timeout * SOFT_TIMEOUT_FRACTION)
        for worker in list(self._pool):
            if worker.state == "stale" or worker.proc.poll() is not None:
                worker.sent.clear()  # the previous call's items
                self._replace(worker, kinds, soft_timeout, count=False)
            elif not set(kinds) <= worker.kinds:
                worker.load(kinds)
        while len(self._pool) < min(self.workers, len(items)):
            self._pool.append(_Worker(kinds, soft_timeout))

        groups = _Groups(items)
        unfinished = len(items)
        try:
            while unfinished:
                for worker in self._pool:
                    if worker.state == "ready":
                        self._feed(worker, items, groups)
                waiting = [w for w in self._pool if w.state == "starting" or w.sent]
                if not waiting:  # cannot happen: every unfinished item is queued in some worker
                    raise RlvrxError(f"grading pool lost track of {unfinished} items")
                wait = max(0.0, min(w.deadline for w in waiting) - time.monotonic())
                writing = [w.in_fd for w in self._pool if w.outbox]
                readable, writable, _ = select.select([w.fd for w in waiting], writing, [], wait)
                if readable and COALESCE:
                    time.sleep(max(0.0, min(COALESCE, min(w.deadline for w in waiting) - time.monotonic())))
                for worker in self._pool:
                    if worker.outbox and worker.in_fd in writable:
                        worker.flush()
                for worker in waiting:
                    if worker.fd in readable:
                        lines = worker.read_lines()
                        if lines is None:  # the worker died
                            code = worker.proc.wait()
                            if worker.state == "starting":
                                raise RlvrxError(f"a grading worker failed to start (exit code {code}); see its error above")
                            index = self._replace(worker, kinds, soft_timeout)
                            if index is None:
                                continue
                            unfinished -= 1
                            yield index, GradeResult(False, status="error", error=f"the grading worker died (exit code {code})")
                            continue
                        for message in lines:
                            if isinstance(message, dict):
                                if not message["ready"]:
                                    raise RlvrxError(f"a grading worker could not load graders {kinds}: {message.get('error')}")
                                worker.loads_pending -= 1
                                if worker.loads_pending == 0 and worker.state == "starting":
                                    worker.state = "ready"
                            elif worker.sent:
                                index = worker.sent.popleft()
                                worker.deadline = time.monotonic() + self.timeout  # the next item's clock
                                unfinished -= 1
                                yield index, GradeResult(bool(message[0]), *message[1:])
                    elif time.monotonic() >= worker.deadline:
                        if worker.state == "starting":
                            raise RlvrxError(f"a grading worker did not start within {STARTUP_TIMEOUT:g}s")
                        index = self._replace(worker, kinds, soft_timeout)
                        assert index is not None  # past its deadline, a ready worker has an item in flight
                        unfinished -= 1
                        yield index, GradeResult(False, status="timeout", error=f"no verdict within {self.timeout:g}s; the worker was killed and replaced")
        except BaseException:
            # Interrupted mid-call (an error, Ctrl-C, or the caller stopped iterating): workers with
            # items in flight would answer for them later, so they are replaced on the next call.
            for worker in self._pool:
                if worker.sent:
                    worker.state = "stale"
            raise
        finally:
            for worker in self._pool:
                worker.lane.clear()

    def _feed(self, worker: _Worker, items: list[GradeItem], groups: _Groups) -> None:
        """Top up `worker`'s queue from its lane, which it refills with whole (gold, kind) groups or,
        when none are left, with the later half of the longest other lane. Queues hold up to CHUNK
        items, fewer near the end (about half a fair share), so that the last items spread over
        all workers and one slow item does not hold up many others."""
        unsent = groups.count + sum(len(w.lane) for w in self._pool)
        limit = max(1, min(CHUNK, -(-unsent // (2 * len(self._pool)))))
        if len(worker.sent) >= max(1, min(REFILL_AT, limit // 2)):
            return
        lane = worker.lane
        while len(lane) < limit and groups.queue:
            lane.extend(groups.take())
        if not lane:
            victim = max(self._pool, key=lambda w: len(w.lane))
            for _ in range((len(victim.lane) + 1) // 2):
                lane.appendleft(victim.lane.pop())
        batch = [lane.popleft() for _ in range(min(len(lane), limit - len(worker.sent)))]
        if not batch:
            return
        if not worker.sent:
            worker.deadline = time.monotonic() + self.timeout
        worker.sent.extend(batch)
        worker.send({"items": [[items[i].completion, str(items[i].gold), items[i].kind] for i in batch]})

    def _replace(self, worker: _Worker, kinds: list[str], soft_timeout: float, count: bool = True) -> int | None:
        """Kill `worker` and start another in its place, which takes over its queue but the head
        item; return that item (the one that timed out or crashed the worker), if any."""
        worker.kill()
        position = self._pool.index(worker)
        successor = self._pool[position] = _Worker(sorted(set(kinds) | worker.kinds), soft_timeout)
        if count:
            self.restarts += 1
        head = worker.sent.popleft() if worker.sent else None
        successor.lane.extend(worker.sent)
        successor.lane.extend(worker.lane)
        return head


def grade_many(items: Iterable, workers: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> list[GradeResult]:
    """One-shot: start a pool, grade `items` (GradeItem or (completion, gold[, kind])), stop the pool."""
    with GradingPool(workers=workers, timeout=timeout) as pool:
        return pool.grade(items)
