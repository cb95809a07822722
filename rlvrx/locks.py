"""SHIM(#18): re-exports for the final pass; delete once nothing imports it."""

from rlvrx.io.locks import RUN_LOCK, LockedError, locked, run_locked

__all__ = ["RUN_LOCK", "LockedError", "locked", "run_locked"]
