"""Errors users see as one line. Exit code 2 for usage/config errors, 1 for runtime failures."""


class RlvrxError(Exception):
    """A failure with a message meant for the user; the CLI prints it as one line."""

    exit_code = 1


class UsageError(RlvrxError):
    """Bad input from the user: a recipe, an argument, a path."""

    exit_code = 2


class CheckpointError(RlvrxError):
    """A checkpoint directory that cannot be read, or checkpoints that do not match."""
