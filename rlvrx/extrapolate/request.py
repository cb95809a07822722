"""`rlvrx extrapolate weights` as one library call: a request (RUN with steps, or two model directories;
two-point, lstsq or rank1) checked, turned into sources and a method, and the result optionally
registered in the run's trajectory."""

from __future__ import annotations

import os
from pathlib import Path

from rlvrx.errors import ParameterError
from rlvrx.extrapolate.inputs import check_registrable, default_output, register_result, resolve_alpha, sources_from_run, window_sources
from rlvrx.extrapolate.options import METHODS, Progress, Source, Warn, WeightsExtrapolation, WeightsOptions
from rlvrx.extrapolate.weights import extrapolate_lstsq, extrapolate_rank1, extrapolate_two_point
from rlvrx.hub import model_dir


def extrapolate_weights(
    run: str | os.PathLike | None = None,
    *,
    base: int | None = None,
    second: int | None = None,
    target: int | None = None,
    alpha: float | None = None,
    base_path: str | os.PathLike | None = None,
    second_path: str | os.PathLike | None = None,
    fit: str = "two-point",
    window: tuple[int, int] | None = None,
    rank: int = 1,
    out: str | os.PathLike | None = None,
    register: bool = False,
    options: WeightsOptions | None = None,
    progress: Progress | None = None,
    warn: Warn | None = None,
) -> WeightsExtrapolation:
    """The `rlvrx extrapolate weights` request: checkpoints by step from RUN's trajectory, or two
    model directories; two-point or least squares; optional registration in the trajectory."""
    options = options or WeightsOptions()
    if any(not pattern.strip() for pattern in options.copy_patterns):
        raise ParameterError(
            "{copy_patterns} '': an empty pattern matches every tensor name (nothing would be extrapolated); give a name substring such as norm",
            "copy_patterns",
        )
    if fit not in METHODS:
        raise ParameterError("{fit} {value!r}: use one of {methods}", "fit", value=fit, methods=", ".join(METHODS))
    if rank != 1 and fit != "rank1":
        raise ParameterError("{rank} {value} is for {fit:rank1}", "rank", "fit", value=rank)
    if register and run is None:
        raise ParameterError("{register} needs the {run} directory whose trajectory.json should record the result", "register", "run")

    if fit == "rank1":
        given = [name for name, value in (("second", second), ("alpha", alpha), ("base_path", base_path), ("second_path", second_path)) if value is not None]
        if given:
            raise ParameterError(
                "{0} is not used by {fit:rank1}; it takes {run}, {base:B}, {window:A:C} and {target:T}", given[0], "fit", "run", "base", "window", "target"
            )
        if run is None or base is None or target is None:
            raise ParameterError(
                "{fit:rank1} needs {run}, {base:B} (the anchor step), {target:T} and usually {window:A:C}", "fit", "run", "base", "target", "window"
            )
        src_base = sources_from_run(run, [base])[0]
        fitted = window_sources(run, window, minimum=1, exclude=base)
        out = Path(out) if out is not None else default_output(run, target)
        if register:
            check_registrable(run, target, options.overwrite)
        result = extrapolate_rank1(src_base, fitted, target, out, rank=rank, options=options, progress=progress, warn=warn)
    elif fit == "lstsq":
        given = [
            name
            for name, value in (("base", base), ("second", second), ("alpha", alpha), ("base_path", base_path), ("second_path", second_path))
            if value is not None
        ]
        if given:
            raise ParameterError(
                "{0} is for the two-point method; {fit:lstsq} takes {run}, {window:A:B} and {target}", given[0], "fit", "run", "window", "target"
            )
        if run is None or target is None:
            raise ParameterError("{fit:lstsq} needs {run} and {target} (and usually {window:A:B})", "fit", "run", "target", "window")
        sources = window_sources(run, window)
        out = Path(out) if out is not None else default_output(run, target)
        if register:
            check_registrable(run, target, options.overwrite)
        result = extrapolate_lstsq(sources, target, out, options=options, progress=progress, warn=warn)
    else:
        if window is not None:
            raise ParameterError("{window} is for {fit:lstsq} or rank1; the two-point method uses {base} and {second}", "window", "fit", "base", "second")
        if (base_path is None) != (second_path is None):
            raise ParameterError("give both {base_path} and {second_path} (two model directories), or neither", "base_path", "second_path")
        if base_path is None:
            if run is None or base is None or second is None:
                raise ParameterError(
                    "give {run} with {base:S0} {second:S1} (steps in its trajectory), or {base_path}/{second_path} with {alpha}",
                    "run",
                    "base",
                    "second",
                    "base_path",
                    "second_path",
                    "alpha",
                )
            src_base, src_second = sources_from_run(run, [base, second])
        else:
            src_base, src_second = Source(model_dir(base_path), base), Source(model_dir(second_path), second)
        alpha, target = resolve_alpha(base, second, target, alpha)
        if out is None:
            if run is None or target is None:
                raise ParameterError("give {out:DIR} (the default RUN/extrapolated/step_T needs {run} and an integer target step)", "out", "run")
            out = default_output(run, target)
        if register:
            check_registrable(run, target, options.overwrite)
        result = extrapolate_two_point(src_base, src_second, alpha, out, target_step=target, options=options, progress=progress, warn=warn)
    if register:
        register_result(run, result, hash=options.hash_registered)
    return result
