"""The grading worker process: `python -c "from rlvrx.verify.worker import worker_main; worker_main()" SOFT`.

Each worker is a plain `python -c` subprocess (not multiprocessing: spawn would re-import the
caller's `__main__`, which may import torch) that imports only the grading modules and the graders
it needs. SOFT is the soft timeout in seconds (rlvrx.verify.graders.grade_guarded) for each item.

Protocol, one JSON line per message. Parent -> worker: {"load": [kinds]} or {"items": [[c, g, k], ...]}.
Worker -> parent: {"ready": true} / {"ready": false, "error"}, and for each item, in order and as
soon as it is graded, [correct, extracted, answer_key, status, error].
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Callable

from rlvrx.verify.graders import grade_guarded, load_grader

WORKER_COMMAND = "from rlvrx.verify.worker import worker_main; worker_main()"


def worker_main() -> None:
    soft_timeout = float(sys.argv[1]) if len(sys.argv) > 1 else None
    # Our replies go to a private copy of stdout; anything a library prints lands on stderr.
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business; it closes us.
    _die_with_parent()
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    graders: dict[str, Callable] = {}

    def reply(message) -> None:  # unbuffered: the parent times each item from the previous reply
        data = (json.dumps(message) + "\n").encode("utf-8")
        while data:
            data = data[os.write(reply_fd, data) :]

    for line in sys.stdin.buffer:
        message = json.loads(line)
        if "load" in message:
            try:
                for kind in message["load"]:
                    graders[kind] = load_grader(kind)
                    if kind == "math":  # warm up the LaTeX parser so the first item is not slow
                        grade_guarded(graders[kind], "\\boxed{1}", "1", None)
                reply({"ready": True})
            except BaseException as e:
                reply({"ready": False, "error": f"{type(e).__name__}: {e}"})
            continue
        for completion, gold, kind in message["items"]:
            grader = graders.get(kind)
            if grader is None:
                try:
                    grader = graders[kind] = load_grader(kind)
                except Exception as e:
                    reply([False, None, None, "error", str(e)])
                    continue
            r = grade_guarded(grader, completion, gold, soft_timeout)
            reply([r.correct, r.extracted, r.answer_key, r.status, r.error])
    # The parent closed our stdin: leave without tearing down sympy's caches, which is slow.
    sys.stderr.flush()
    os._exit(0)


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent dies, so a worker stuck in C code is never orphaned."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:
        pass
    if os.getppid() == 1:  # the parent is already gone
        os._exit(0)
