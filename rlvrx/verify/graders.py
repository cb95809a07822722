"""Grading kinds, the guarded call of a grader, and in-process grading (`grade_one`).

Kinds name a grader `(completion, gold) -> (correct, extracted, answer_key)`:
  - "arithmetic": the leading integer of the completion (rlvrx.verify.arithmetic); cheap, no sympy.
  - "math": math-verify, gold parsed first (rlvrx.verify.math); GSM8K's plain-number golds too.
  - "package.module:function": any importable function with that signature (it may also return
    just a bool, or (bool, extracted)).
    Workers inherit the caller's sys.path, so such a module need not be installed (the test suite's
    own graders in tests/graders.py are named this way).

Soft timeouts: math-verify's own timeouts use SIGALRM, which works in the main thread only, and an
alarm can be lost or never acted on (math-verify issue #65, `\\dfrac{5^{(5^{(5^{(5^5)})} - 4)} - 5}{16}`,
runs far past math-verify's 5 s timeout). So math-verify's alarms are switched off and
`grade_guarded` sets its own SIGALRM around each grader, which stops graders stuck in Python code
(the issue #65 input too). C code that never checks for signals cannot be interrupted at all: for
that the worker pool (rlvrx.verify.pool) kills the worker process.
"""

from __future__ import annotations

import importlib
import signal
import threading
from typing import Callable

from rlvrx.errors import RlvrxError, UsageError
from rlvrx.verify.types import GradeResult

DEFAULT_TIMEOUT = 10.0

# The built-in kinds, each a "module:function" imported on first use (so importing this module stays cheap).
GRADERS: dict[str, str] = {
    "arithmetic": "rlvrx.verify.arithmetic:grade_arithmetic",
    "math": "rlvrx.verify.math:grade_math",
}
BUILTIN_KINDS = tuple(GRADERS)


def import_dotted(path: str, what: str) -> Callable:
    """The callable named by `path` ('package.module:function'); a UsageError naming `what`
    (e.g. "task", "grading kind") when it cannot be imported or is not callable."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{what} {path!r}: write it as 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{what} {path!r}: cannot import module {module_name!r} ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"{what} {path!r}: module {module_name!r} has no callable {attr!r}")
    return fn


def _unknown_kind(kind: str) -> UsageError:
    return UsageError(f"unknown grading kind {kind!r}; use one of {', '.join(BUILTIN_KINDS)} or 'package.module:function'")


def check_kind(kind: str) -> None:
    """A UsageError unless `kind` is a built-in kind or has the shape 'package.module:function'."""
    if kind in GRADERS:
        return
    module_name, sep, attr = kind.partition(":")
    if not (sep and module_name and attr):
        raise _unknown_kind(kind)


def load_grader(kind: str) -> Callable:
    """The grader function of `kind` (imports it)."""
    if kind in GRADERS:
        return import_dotted(GRADERS[kind], "grading kind")
    if ":" in kind:
        return import_dotted(kind, "grading kind")
    raise _unknown_kind(kind)


def _normalise(value) -> tuple[bool, str | None, str | None]:
    if isinstance(value, tuple):
        correct = bool(value[0])
        extracted = None if len(value) < 2 or value[1] is None else str(value[1])
        key = str(value[2]) if len(value) > 2 and value[2] is not None else extracted
        return correct, extracted, key
    return bool(value), None, None


class _SoftTimeout(BaseException):
    """Raised by SIGALRM inside a grader; a BaseException so graders' `except Exception` let it pass."""


def _on_alarm(signum, frame):
    raise _SoftTimeout()


def grade_guarded(grader: Callable, completion: str, gold: str, soft_timeout: float | None) -> GradeResult:
    """Run one grader, with a SIGALRM soft timeout when called in the main thread. Never raises for
    a grader's failure: a timeout or an error is a wrong GradeResult that says why."""
    use_alarm = bool(soft_timeout) and threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    previous = None
    if use_alarm and soft_timeout:
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, soft_timeout)
    try:
        correct, extracted, key = _normalise(grader(completion, gold))
        return GradeResult(correct, extracted, key)
    except _SoftTimeout:
        return GradeResult(False, status="timeout", error=f"grading stopped after {soft_timeout:g}s")
    except RlvrxError as e:
        return GradeResult(False, status="error", error=str(e))
    except Exception as e:  # a grader bug or a pathological input: wrong, and say why
        return GradeResult(False, status="error", error=f"{type(e).__name__}: {e}"[:500])
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def grade_one(completion: str, gold: str, kind: str = "math", timeout: float | None = DEFAULT_TIMEOUT) -> GradeResult:
    """Grade one item in this process. `timeout` is enforced with SIGALRM in the main thread only and
    cannot stop a grader stuck in C code: use `GradingPool` for untrusted model output at scale."""
    check_kind(kind)
    return grade_guarded(load_grader(kind), completion, str(gold), timeout)
