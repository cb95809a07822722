"""rlvrx.io.locks with real processes: a second holder is refused with the first one's pid, a waiter gets
its turn, and a SIGKILLed holder leaves no lock behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from rlvrx.errors import RlvrxError
from rlvrx.io.locks import LockedError, locked

HOLD = """
import sys, time
from rlvrx.io.locks import locked
with locked(sys.argv[1], "the test output"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    open(sys.argv[1] + ".done", "w").close()  # last thing done while holding the lock
"""


def hold(path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_with_the_pid_then_admitted(tmp_path):
    lock = tmp_path / "out.lock"
    proc = hold(lock, 60)
    try:
        with pytest.raises(LockedError, match=rf"the eval output is in use by pid {proc.pid} \(lock {lock}\)"):
            with locked(lock, "the eval output"):
                pass
        assert issubclass(LockedError, RlvrxError)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with locked(lock, "the eval output"):  # the kernel released the dead holder's lock
        assert lock.read_text().strip() == str(os.getpid())


def test_waiter_gets_the_lock_when_the_holder_exits(tmp_path):
    lock = tmp_path / "trajectory.json.lock"
    proc = hold(lock, 1.0)
    with locked(lock, "trajectory", wait=True):
        assert (tmp_path / "trajectory.json.lock.done").exists()  # admitted only after the holder's section
    proc.wait()
