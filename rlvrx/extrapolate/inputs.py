"""Where `rlvrx extrapolate weights` finds its inputs and puts its output: checkpoints by step from a
run's trajectory (or a window of them), the output's checks and default place, the alpha of the
request (worded in its flags), and registering the result in the trajectory."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

from rlvrx import formulas
from rlvrx.errors import CheckpointError, ParameterError, UsageError
from rlvrx.extrapolate.options import Source, WeightsExtrapolation
from rlvrx.io.atomic import check_replaceable, recover
from rlvrx.io.identity import compare_structure
from rlvrx.io.reader import Checkpoint, is_checkpoint_dir


def open_inputs(sources: Sequence[Source]) -> list[Checkpoint]:
    ckpts = [Checkpoint(s.path) for s in sources]
    latest = ckpts[-1]
    for ckpt in ckpts[:-1]:
        diff = compare_structure(latest, ckpt)
        if diff:
            raise CheckpointError(f"inputs do not match: {diff}")
    return ckpts


def check_output(out: Path, sources: Sequence[Source], overwrite: bool) -> None:
    """Refuse an output that would replace an input, a directory holding one, a run directory, or
    anything but an earlier checkpoint (--overwrite replaces a model, never a directory of results)."""
    recover(out)  # a writer killed between atomic_dir's renames: its previous output comes back first
    resolved = out.resolve()
    for src in sources:
        if src.path.resolve() == resolved:
            raise ParameterError("output {path} is one of the input checkpoints; choose another {out}", "out", path=out)
        if resolved in src.path.resolve().parents:
            raise ParameterError("output {path} holds the input checkpoint {source}; choose another {out}", "out", path=out, source=src.path)
    if not out.exists():
        return
    if not overwrite:
        raise ParameterError("{path} already exists; pass {overwrite} to replace it (it is kept until the new one is complete)", "overwrite=True", path=out)
    check_replaceable(out)
    if not out.is_dir() or not (is_checkpoint_dir(out) or not any(out.iterdir())):
        raise ParameterError(
            "{path} exists and is not a checkpoint directory; {overwrite} replaces only a model, choose another {out}", "overwrite", "out", path=out
        )


def resolve_alpha(base: int | None, second: int | None, target: int | None, alpha: float | None) -> tuple[float, int | None]:
    """rlvrx.formulas.resolve_alpha for extrapolate_weights and extrapolate_logits: the same checks, as
    ParameterErrors naming base, second, target, alpha (the CLI words them as its flags)."""
    if alpha is not None and not math.isfinite(alpha):
        raise ParameterError("{alpha} {value}: must be a finite number", "alpha", value=alpha)
    if base is not None and second is not None:
        if target is not None and alpha is not None:
            raise ParameterError("give {target} or {alpha}, not both (alpha = (target - base) / (second - base))", "target", "alpha")
        if target is None and alpha is None:
            raise ParameterError("give {target:T} (alpha = (T - base) / (second - base)) or {alpha}", "target", "alpha")
        if second == base:
            raise ParameterError("{base} and {second} are both step {step}; extrapolation needs two different steps", "base", "second", step=base)
        if second < base:
            raise ParameterError(
                "{second} ({s1}) is before {base} ({s0}); the second checkpoint must be the later one (swap them)", "second", "base", s1=second, s0=base
            )
    elif alpha is None:
        raise ParameterError("two model directories without steps need {alpha} (or {base:S0} {second:S1} {target:T})", "alpha", "base", "second", "target")
    return formulas.resolve_alpha(base, second, target, alpha)


def default_output(run: str | os.PathLike, target_step: int) -> Path:
    from rlvrx.rundir import RunDir

    return RunDir(run).extrapolated_checkpoint(target_step)


def check_registrable(run: str | os.PathLike, target_step: int | None, overwrite: bool) -> None:
    """Fail before any work when `--register` could not record the result at target_step."""
    from rlvrx.trajectory import Trajectory

    if target_step is None:
        raise ParameterError("{register} needs an integer target step ({target})", "register", "target")
    traj = Trajectory.load(run, create=True)
    for entry in traj:
        if entry.step == target_step:
            if entry.kind != "extrapolated":
                raise ParameterError(
                    "step {step} in {manifest} is a real checkpoint ({kind}: {path}); "
                    "an extrapolated model cannot replace it; drop {register} or pick another {target}",
                    "register",
                    "target",
                    step=target_step,
                    manifest=traj.manifest,
                    kind=entry.kind,
                    path=entry.path,
                )
            if not overwrite:
                raise ParameterError(
                    "step {step} in {manifest} already holds an extrapolated model ({path}); pass {overwrite} to replace it",
                    "overwrite=True",
                    step=target_step,
                    manifest=traj.manifest,
                    path=entry.path,
                )


def register_result(run: str | os.PathLike, result: WeightsExtrapolation, hash: bool = True) -> None:
    """Add the output to RUN/trajectory.json as kind `extrapolated` at its target step."""
    from rlvrx.trajectory import Trajectory

    traj = Trajectory.load(run, create=True)
    meta = {"method": result.method, "from_steps": [i["step"] for i in result.inputs]}
    if result.alpha is not None:
        meta["alpha"] = result.alpha
    traj.add(result.target_step, result.out, kind="extrapolated", hash=hash, replace=True, meta=meta)
    traj.save()
    result.registered = True


def sources_from_run(run: str | os.PathLike, steps: Sequence[int]) -> list[Source]:
    from rlvrx.trajectory import Trajectory

    traj = Trajectory.load(run)
    return [Source(traj.path_of(step), step, traj.get(step).sha256) for step in steps]


def window_sources(run: str | os.PathLike, window: tuple[int, int] | None, minimum: int = 2, exclude: int | None = None) -> list[Source]:
    """The run's base/rl checkpoints (extrapolated ones are never fitted) inside the window, but the
    step `exclude` (rank1's base); fewer than `minimum` is a UsageError."""
    from rlvrx.trajectory import Trajectory

    traj = Trajectory.load(run)
    entries = [e for e in traj.select(kinds=("base", "rl"), window=window) if e.step != exclude]
    if len(entries) < minimum:
        where = f"in window {window[0]}:{window[1]}" if window else ""
        fit = "least squares" if exclude is None else f"a rank-1 fit (base {exclude} excluded)"
        raise UsageError(
            f"{traj.manifest}: {fit} needs at least {minimum} base/rl checkpoints {where}, found {[e.step for e in entries]} (steps: {traj.steps})"
        )
    return [Source(traj.resolve(e), e.step, e.sha256) for e in entries]
