"""Test-only graders for the grading pool, named by the pool's `module:function` kinds
(e.g. "graders:hang"; tests/ is on sys.path through pytest's `pythonpath`, and pool workers
inherit the parent's sys.path)."""

from __future__ import annotations

import os
import signal
import sys
import time

HEAVY_MODULES = ("torch", "transformers", "numpy", "sympy", "math_verify")

HANG = "graders:hang"
CRASH = "graders:crash"
SLEEP = "graders:sleep"
PROBE = "graders:probe"


def hang(completion: str, gold: str):
    """Stall like C code that never checks for signals: the soft alarm cannot stop it, only a kill.
    Never call it in-process (grade_one): it blocks SIGALRM for good."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    while True:
        time.sleep(3600)


def crash(completion: str, gold: str):
    """Exit the worker process at once."""
    os._exit(3)


def sleep(completion: str, gold: str):
    """Sleep float(completion) seconds, then answer correct."""
    time.sleep(float(completion))
    return True, completion, completion


def probe(completion: str, gold: str):
    """Report which heavy modules the grading process has imported, comma-separated."""
    loaded = ",".join(m for m in HEAVY_MODULES if m in sys.modules)
    return True, loaded, loaded
