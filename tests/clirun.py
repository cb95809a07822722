"""The real CLI entry point in this process: `run_cli(*args)` runs rlvrx.cli.main (what `python -m rlvrx`
runs) and returns (exit code, stdout, stderr), leaving argv, the working directory, the signal
handlers main() installs and the garbage collector's freeze as they were."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import signal
import sys


def run_cli(*args, cwd=None) -> tuple[int, str, str]:
    from rlvrx.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, here = sys.argv, os.getcwd()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sys.argv = ["rlvrx", *map(str, args)]
    code = 0
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(here)
        for s, h in handlers.items():
            signal.signal(s, h)
        gc.unfreeze()
    return code, out.getvalue(), err.getvalue()
