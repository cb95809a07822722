"""Errors users see as one line. Exit code 2 for usage/config errors, 1 for runtime failures."""

from __future__ import annotations

from collections.abc import Mapping


class RlvrxError(Exception):
    """A failure with a message meant for the user; the CLI prints it as one line."""

    exit_code = 1


class UsageError(RlvrxError):
    """Bad input from the user: a recipe, an argument, a path."""

    exit_code = 2


class CheckpointError(RlvrxError):
    """A checkpoint directory that cannot be read, or checkpoints that do not match."""


class ParameterError(UsageError):
    """A bad argument of a library call, worded around the names of its parameters.

    `template` is a str.format template; its fields name the parameters (`params`: "{alpha}", or "{0}"
    for the first) or the values (keyword `values`: "{value!r}"). A parameter given as "name=word"
    reads as `word` to a Python caller ("overwrite=True"); a format spec on a parameter field is a
    placeholder for its value ("{out:DIR}": "out=DIR" to a Python caller, "--out DIR" on the CLI).
    str(exc) names the parameters; `exc.worded(flags)` is the same sentence with each parameter named
    by flags[name] instead (the CLI's flags). Values are substituted as given, never re-parsed, so
    a path holding braces is safe.

        ParameterError("give {target} or {alpha}, not both", "target", "alpha")
        ParameterError("{alpha} {value}: must be a finite number", "alpha", value=alpha)
    """

    def __init__(self, template: str, *params: str, **values: object):
        self.template, self.values = template, values
        self.api_names = {p.partition("=")[0]: p for p in params}  # name -> its word for a Python caller
        self.params = tuple(self.api_names)
        clash = set(self.params) & set(values)
        if clash:
            raise ValueError(f"ParameterError: {sorted(clash)} are both a parameter and a value")
        super().__init__(self.worded({}))

    def worded(self, flags: Mapping[str, str]) -> str:
        """The message with each parameter `name` called flags[name] (its Python name where absent)."""
        names = {p: _Name(flags[p], cli=True) if p in flags else _Name(self.api_names[p], cli=False) for p in self.params}
        return self.template.format(*names.values(), **names, **self.values)

    def __reduce__(self) -> tuple:  # picklable (a worker process raising it), with its parameters
        return _rebuild, (self.template, list(self.api_names.values()), self.values)


def _rebuild(template: str, params: list[str], values: dict) -> ParameterError:
    return ParameterError(template, *params, **values)


class _Name:
    """A parameter's name in a ParameterError message; a format spec is a placeholder for its value."""

    def __init__(self, word: str, cli: bool):
        self.word, self.cli = word, cli

    def __format__(self, spec: str) -> str:
        if not spec:
            return self.word
        return f"{self.word} {spec}" if self.cli else f"{self.word}={spec}"
