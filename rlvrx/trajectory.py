"""A run's ordered checkpoints: the `trajectory.json` manifest, with scan, add and verify."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from rlvrx.errors import CheckpointError, ParameterError, UsageError
from rlvrx.hub import model_dir
from rlvrx.io.atomic import atomic_write_text
from rlvrx.io.identity import checkpoint_sha256, compare_structure
from rlvrx.io.jsonio import read_json
from rlvrx.io.locks import locked
from rlvrx.io.reader import Checkpoint, is_checkpoint_dir

MANIFEST = "trajectory.json"
LOCK = "trajectory.json.lock"  # held while trajectory.json is read, changed and written
KINDS = ("base", "rl", "extrapolated")
STEP_DIR = re.compile(r"^(?:step_|global_step_|checkpoint-)(\d+)$")


@dataclass
class Entry:
    step: int
    path: str
    kind: str = "rl"
    sha256: str | None = None
    bytes: int = 0
    # RL-Extra: gradient steps actually taken to reach this state (step is the effective step).
    grad_step: int | None = None
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        if self.grad_step is None:
            del data["grad_step"]
        if not self.meta:
            del data["meta"]
        return data


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _entry_from_json(raw: object, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: each entry must be an object with step, path, kind")
    unknown = set(raw) - {"step", "path", "kind", "sha256", "bytes", "grad_step", "meta"}
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    step, path, kind = raw.get("step"), raw.get("path"), raw.get("kind", "rl")
    if not isinstance(step, int) or isinstance(step, bool):
        raise UsageError(f"{where}: step must be an integer, got {step!r}")
    if step < 0:
        raise UsageError(f"{where}: step {step} is negative")
    if not isinstance(path, str) or not path:
        raise UsageError(f"{where}: path must be a non-empty string")
    if kind not in KINDS:
        raise UsageError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    sha256, size, grad_step, meta = raw.get("sha256"), raw.get("bytes"), raw.get("grad_step"), raw.get("meta")
    size, meta = (0 if size is None else size), ({} if meta is None else meta)
    if sha256 is not None and not isinstance(sha256, str):
        raise UsageError(f"{where}: sha256 must be a hex string or null, got {sha256!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UsageError(f"{where}: bytes must be a non-negative integer, got {size!r}")
    if grad_step is not None and (not isinstance(grad_step, int) or isinstance(grad_step, bool) or grad_step < 0):
        raise UsageError(f"{where}: grad_step must be a non-negative integer or null, got {grad_step!r}")
    if not isinstance(meta, dict):
        raise UsageError(f"{where}: meta must be an object, got {meta!r}")
    return Entry(step=step, path=path, kind=kind, sha256=sha256, bytes=size, grad_step=grad_step, meta=meta)


class Trajectory:
    """The checkpoints of one run, sorted by step. Paths are stored relative to the run dir when inside it."""

    def __init__(self, run_dir: str | os.PathLike, entries: Iterable[Entry] = ()):
        self.run_dir = Path(run_dir)
        self.entries: list[Entry] = sorted(entries, key=lambda e: e.step)
        self._pending: list[tuple[Entry, bool]] = []  # (entry, replace) added since load, applied by save

    @property
    def manifest(self) -> Path:
        return self.run_dir / MANIFEST

    @classmethod
    def load(cls, run_dir: str | os.PathLike, create: bool = False) -> "Trajectory":
        run_dir = Path(run_dir)
        manifest = run_dir / MANIFEST
        if not manifest.is_file():
            if create:
                return cls(run_dir)
            if not run_dir.exists():
                raise UsageError(f"{run_dir}: no such run directory")
            raise UsageError(f"{manifest}: no trajectory manifest; create one with `rlvrx snapshot scan DIR --run {run_dir}`")
        raw = read_json(manifest)
        if isinstance(raw, dict):
            raw = raw.get("checkpoints")
        if not isinstance(raw, list):
            raise UsageError(f"{manifest}: expected a list of checkpoint entries")
        entries = [_entry_from_json(item, f"{manifest} entry {i}") for i, item in enumerate(raw)]
        steps = [e.step for e in entries]
        dup = sorted({s for s in steps if steps.count(s) > 1})
        if dup:
            raise UsageError(f"{manifest}: step {dup[0]} appears more than once")
        if steps != sorted(steps):
            raise UsageError(f"{manifest}: steps are out of order ({steps}); entries must be sorted by step")
        return cls(run_dir, entries)

    def save(self) -> None:
        """Write the entries added since load into trajectory.json. Several processes may register
        checkpoints of one run at once (a Slurm array): under a lock, the manifest is read again, this
        object's additions are applied to what it holds now, and the result is written atomically."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with locked(self.run_dir / LOCK, str(self.manifest), wait=True):
            current = {e.step: e for e in Trajectory.load(self.run_dir, create=True).entries}
            for entry, replace in self._pending:
                known = current.get(entry.step)
                if known is not None and not replace and (known.kind, self.resolve(known).resolve()) != (entry.kind, self.resolve(entry).resolve()):
                    raise ParameterError(
                        "step {step} was registered in {manifest} meanwhile ({path}); pass {replace} to replace it",
                        "replace=True",
                        step=entry.step,
                        manifest=self.manifest,
                        path=known.path,
                    )
                current[entry.step] = entry
            self.entries = sorted(current.values(), key=lambda e: e.step)
            atomic_write_text(self.manifest, json.dumps([e.to_json() for e in self.entries], indent=2) + "\n")
            self._pending.clear()

    # -- access ---------------------------------------------------------------------------------

    @property
    def steps(self) -> list[int]:
        return [e.step for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def resolve(self, entry: Entry) -> Path:
        path = Path(entry.path)
        return path if path.is_absolute() else self.run_dir / path

    def get(self, step: int) -> Entry:
        for entry in self.entries:
            if entry.step == step:
                return entry
        raise UsageError(f"{self.manifest}: no checkpoint at step {step} (steps: {self.steps})")

    def path_of(self, step: int) -> Path:
        return self.resolve(self.get(step))

    def select(self, kinds: Iterable[str] = ("base", "rl"), window: tuple[int, int] | None = None) -> list[Entry]:
        kinds = set(kinds)
        out = [e for e in self.entries if e.kind in kinds]
        if window is not None:
            out = [e for e in out if window[0] <= e.step <= window[1]]
        return out

    # -- changes --------------------------------------------------------------------------------

    def _relative(self, path: Path) -> str:
        path = Path(path).resolve()
        try:
            return str(path.relative_to(self.run_dir.resolve()))
        except ValueError:
            return str(path)

    def add(
        self,
        step: int,
        path: str | os.PathLike,
        kind: str = "rl",
        hash: bool = True,
        replace: bool = False,
        grad_step: int | None = None,
        meta: dict | None = None,
    ) -> Entry:
        if step < 0:
            raise UsageError(f"step {step} is negative")
        if kind not in KINDS:
            raise UsageError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        path = Path(path)
        if not path.is_absolute() and not path.exists() and (self.run_dir / path).exists():
            path = self.run_dir / path
        if not path.exists():
            path = model_dir(path)  # a hub id org/name[@revision]: its cached snapshot
        if not path.exists():
            raise UsageError(f"{path}: no such checkpoint directory")
        ckpt = Checkpoint(path)  # validates the directory and its headers
        ckpt.infos()
        existing = [e for e in self.entries if e.step == step]
        if existing and not replace and existing[0].kind == kind and self.resolve(existing[0]).resolve() == path.resolve():
            return existing[0]  # already registered: adding it again (e.g. re-running a scan with --base) is a no-op
        if existing and not replace:
            raise ParameterError(
                "step {step} is already in {manifest} ({path}); pass {replace} to replace it",
                "replace=True",
                step=step,
                manifest=self.manifest,
                path=existing[0].path,
            )
        entry = Entry(
            step=step,
            path=self._relative(path),
            kind=kind,
            sha256=checkpoint_sha256(path) if hash else None,
            bytes=ckpt.nbytes(),
            grad_step=grad_step,
            meta=meta or {},
        )
        self.entries = sorted([e for e in self.entries if e.step != step] + [entry], key=lambda e: e.step)
        self._pending.append((entry, replace))
        return entry

    def scan(self, directory: str | os.PathLike, hash: bool = True, replace: bool = False) -> list[Entry]:
        """Register checkpoints under `directory` named step_N, global_step_N (verl) or checkpoint-N."""
        directory = Path(directory)
        if not directory.is_dir():
            raise UsageError(f"{directory}: no such directory to scan")
        found: list[tuple[int, Path]] = []
        for child in sorted(directory.iterdir()):
            match = STEP_DIR.match(child.name)
            if not match or not child.is_dir():
                continue
            step = int(match.group(1))
            for candidate in (child, child / "actor" / "huggingface", child / "huggingface"):
                if is_checkpoint_dir(candidate):
                    found.append((step, candidate))
                    break
            else:
                if (child / "actor").is_dir():
                    raise CheckpointError(f"{child}: verl checkpoint without HF weights; run `rlvrx snapshot convert {child}` first")
        steps = [s for s, _ in found]
        dup = sorted({s for s in steps if steps.count(s) > 1})
        if dup:
            raise UsageError(f"{directory}: more than one checkpoint for step {dup[0]}")
        added = []
        for step, path in sorted(found):
            known = [e for e in self.entries if e.step == step]
            if known and self.resolve(known[0]).resolve() == path.resolve() and not replace:
                continue
            added.append(self.add(step, path, kind="rl", hash=hash, replace=replace))
        return added

    # -- checks ---------------------------------------------------------------------------------

    def verify(self, hash: bool = True) -> list[str]:
        """Problems found: missing dirs, hash mismatches, tensors that differ between checkpoints."""
        problems: list[str] = []
        reference: Checkpoint | None = None
        for entry in self.entries:
            path = self.resolve(entry)
            try:
                ckpt = Checkpoint(path)
                ckpt.infos()
            except CheckpointError as exc:
                problems.append(f"step {entry.step}: {exc}")
                continue
            if hash and entry.sha256 and checkpoint_sha256(path) != entry.sha256:
                problems.append(f"step {entry.step}: {path} changed since it was registered (sha256 mismatch)")
            if reference is None:
                reference = ckpt
                continue
            diff = compare_structure(reference, ckpt)
            if diff:
                problems.append(f"step {entry.step}: {diff}")
        return problems

    def checkpoints(self, entries: Iterable[Entry] | None = None) -> list[tuple[int, Checkpoint]]:
        """Open checkpoints (lazily) for the given entries, checking they share one structure."""
        entries = list(self.entries if entries is None else entries)
        opened = [(e.step, Checkpoint(self.resolve(e))) for e in entries]
        for _, ckpt in opened[1:]:
            diff = compare_structure(opened[0][1], ckpt)
            if diff:
                raise CheckpointError(diff)
        return opened


def parse_step_paths(pairs: Iterable[str]) -> Trajectory:
    """`STEP=PATH` pairs from the command line -> an in-memory trajectory (steps must be distinct)."""
    pairs = list(pairs)
    entries = []
    for pair in pairs:
        step, sep, path = pair.partition("=")
        if not sep or not step.strip().lstrip("-").isdigit():
            raise UsageError(f"{pair!r}: expected STEP=PATH, e.g. 100=runs/a/checkpoints/step_000100")
        entries.append(Entry(step=int(step), path=str(model_dir(path).resolve()), kind="rl"))
    steps = [e.step for e in entries]
    if len(set(steps)) != len(steps):
        raise UsageError(f"duplicate steps in {list(pairs)}")
    if any(s < 0 for s in steps):
        raise UsageError("steps must be non-negative")
    return Trajectory(Path.cwd(), entries)
