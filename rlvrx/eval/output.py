"""One eval output: the result file of one model on one task, with its settings beside it.

`OUT/<model>/<task>.jsonl` holds the graded records and `<task>.settings.json` what made them
(rlvrx.eval.runner, checked and written by check_settings / write_settings). While an eval writes them it holds `OUT/<model>/.<task>.lock` exclusively
(rlvrx.io.locks): a second eval of the same output is refused at once, naming the holder's pid, and no
one truncates or appends to a file another process is writing.

--overwrite never deletes the old results first. The new ones go into a staging folder
`OUT/<model>/.<task>.overwrite/`; `commit()` marks it complete (a `COMPLETE` file, written
atomically), then renames the new settings and the new results over the old ones, then removes the
folder. A kill before the mark leaves the old results untouched (the next open removes the
unfinished staging folder); a kill after it is rolled forward by the next open, under the lock, so
results and settings are replaced together or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from rlvrx.errors import ParameterError
from rlvrx.generation.generations import ResultsFile

SETTINGS_SUFFIX = ".settings.json"
COMPLETE = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EvalOutput:
    """`open()` takes the lock and opens the results for appending (in the staging folder with
    overwrite); it offers ResultsFile's `finished`, `append`, `sync` and `dropped_partial`, and
    `path` is always the final result file. `commit()` after the last record; `close()` always."""

    def __init__(self, folder: str | os.PathLike, stem: str, overwrite: bool = False):
        self.folder = Path(folder)
        self.path = self.folder / f"{stem}.jsonl"
        self.settings_path = self.folder / f"{stem}{SETTINGS_SUFFIX}"
        self.lock_path = self.folder / f".{stem}.lock"
        self.staging = self.folder / f".{stem}.overwrite"
        self.overwrite = overwrite
        self._stack = contextlib.ExitStack()
        self._results: ResultsFile | None = None
        self._committed = False

    # ResultsFile's interface, for the runner
    @property
    def finished(self) -> dict[str, dict]:
        return self._results.finished

    @property
    def dropped_partial(self) -> bool:
        return self._results.dropped_partial

    def append(self, record: dict) -> None:
        self._results.append(record)

    def sync(self) -> None:
        self._results.sync()

    @property
    def writing_settings_path(self) -> Path:
        """Where this run's settings go: beside the final results, or into the staging folder."""
        return self.staging / self.settings_path.name if self.overwrite else self.settings_path

    def open(self) -> "EvalOutput":
        from rlvrx.io.locks import locked

        self.folder.mkdir(parents=True, exist_ok=True)
        self._stack.enter_context(locked(self.lock_path, f"eval output {self.path}"))
        try:
            self._recover()
            if self.overwrite:
                self.staging.mkdir()
                self._results = ResultsFile(self.staging / self.path.name).open()
            else:
                self._results = ResultsFile(self.path).open()
        except BaseException:
            self._stack.close()
            raise
        return self

    def _recover(self) -> None:
        """Finish a swap a kill interrupted after the mark; drop an unfinished staging folder."""
        if not self.staging.exists():
            return
        if (self.staging / COMPLETE).is_file():
            self._swap()
        else:
            shutil.rmtree(self.staging)

    def _swap(self) -> None:
        for target in (self.settings_path, self.path):  # settings first: the results file decides
            staged = self.staging / target.name
            if staged.exists():
                os.replace(staged, target)
        _fsync_dir(self.folder)
        shutil.rmtree(self.staging)

    def commit(self) -> None:
        """With overwrite: replace the old results and settings by the new ones (see the module doc)."""
        self._results.close()
        if self.overwrite:
            from rlvrx.io.atomic import atomic_write_text

            _fsync_dir(self.staging)
            atomic_write_text(self.staging / COMPLETE, "")
            self._swap()
        self._committed = True

    def close(self) -> None:
        """Close the file and release the lock; an overwrite that was not committed leaves the old results as they were."""
        try:
            if self._results is not None:
                self._results.close()
            if self.overwrite and not self._committed and self.staging.exists() and not (self.staging / COMPLETE).exists():
                shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self._stack.close()


def check_settings(path: Path, settings: dict, results: EvalOutput) -> None:
    """Refuse to mix results made with other settings, or by another model, into one file. A file of
    graded generations without settings beside it (e.g. written by another tool) is taken as it is;
    model results must name the same model sha256."""
    from rlvrx.io.jsonio import read_json

    stored = read_json(path, expect=dict) if path.is_file() else {}
    sha = settings.get("model_sha256")
    if sha is not None and stored.get("model_sha256") != sha:
        found = stored.get("model_sha256")
        made_by = f"another model (sha256 {found[:12]}...)" if isinstance(found, str) else "a model it does not name (no model_sha256 in its settings)"
        raise ParameterError(
            "{path} holds results of {made_by}, not of {model} (sha256 {sha}...); pass {overwrite} to replace them, or {out:DIR} to write elsewhere",
            "overwrite=True",
            "out",
            path=results.path,
            made_by=made_by,
            model=settings.get("model"),
            sha=sha[:12],
        )
    for key in ("source", "kind", "engine", "sampling"):
        if key in stored and stored[key] != settings.get(key):
            raise ParameterError(
                "{path} holds results made with {key} {stored!r}, not {given!r}; pass {overwrite} to start over, or {out:DIR} to write elsewhere",
                "overwrite=True",
                "out",
                path=results.path,
                key=key,
                stored=stored[key],
                given=settings.get(key),
            )


def write_settings(path: Path, settings: dict) -> None:
    from rlvrx.io.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
