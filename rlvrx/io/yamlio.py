"""The one YAML reader for text a user hands us (recipes, overrides, task options).

yaml.safe_load builds no objects, but it still expands aliases (a few KB of nested `*a` references
become gigabytes), keeps the last of two equal keys silently, and recurses without bound. This
loader refuses all three with a message naming the line, and bounds the input's size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from rlvrx.errors import UsageError

MAX_BYTES = 1 << 20
MAX_DEPTH = 32


class _StrictLoader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(None, None, f"YAML aliases (*{event.anchor}) are not accepted here; write the value out", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.constructor.ConstructorError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: let SafeLoader say so
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "in the mapping", node.start_mark, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _describe(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start and mark and start.line != mark.line:  # e.g. an unclosed bracket: say where it opened
        problem += f" ({context} at line {start.line + 1})"
    return f"invalid YAML{where}: {problem}"


def load_yaml(text: str, source: str) -> Any:
    """Parse `text` (from `source`, named in errors) or raise a one-line UsageError."""
    if len(text) > MAX_BYTES:
        raise UsageError(f"{source}: {len(text)} characters of YAML; at most {MAX_BYTES} are read")
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise UsageError(f"{source}: {_describe(exc)}") from None
    except RecursionError:
        raise UsageError(f"{source}: invalid YAML: nested too deeply") from None


def read_yaml_file(path: Path) -> Any:
    """The YAML document in `path`, read as UTF-8; every failure is a one-line UsageError naming it."""
    try:
        if path.stat().st_size > MAX_BYTES:
            raise UsageError(f"{path}: {path.stat().st_size} bytes; a YAML file of at most {MAX_BYTES} is read")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return load_yaml(text, str(path))
