"""`rlvrx extrapolate compare`: the predictor shoot-out. For a step T that exists in the run, predict
it from a window A:C of earlier checkpoints with every predictor, and score each against the real
checkpoint: the weight-space error relative to the real drift since the window's end, and (with a
task) eval accuracy next to the real checkpoint's and the window end's.

Predictors (window checkpoints w_0 < ... < w_n = C, all before T):
- two-point: W_w0 + alpha (W_C - W_w0), alpha = (T - w0) / (C - w0);
- lstsq: each parameter's least-squares line through the window, at T;
- rank1: RELEX's temporal rank-1 fit from base w0 over w_1..w_n (--rank r components);
- alpharl: AlphaRL's rank-1 update of C, its norm extrapolated like two-point:
  W_w0 + alpha ||Delta_C||_F u1 v1^T for each 2-D weight (Delta_C = W_C - W_w0), two-point for the rest.

Orchestration only (this module may call extrapolate, linearity and eval; they never call each other)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from rlvrx.errors import UsageError

PREDICTORS = ("two-point", "lstsq", "rank1", "alpharl")


@dataclass
class ShootoutOptions:
    rank: int = 1
    task: str | None = None
    task_options: dict = field(default_factory=dict)
    samples: int | None = None
    limit: int | None = None
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False


def default_output(run: str | os.PathLike, target: int, window: tuple[int, int]) -> Path:
    from rlvrx.rundir import RunDir

    return RunDir(run).extrapolated / f"compare-t{target}-w{window[0]}-{window[1]}"


def predict_all(
    run: Path, target: int, window: tuple[int, int] | None, out: Path, options: ShootoutOptions, note: Callable[[str], None] = lambda m: None
) -> dict:
    """Write every predictor's checkpoint under `out` and measure its weight error; returns the table's rows."""
    from rlvrx.extrapolate.compare import relative_error
    from rlvrx.extrapolate.inputs import window_sources
    from rlvrx.extrapolate.options import WeightsOptions
    from rlvrx.extrapolate.weights import extrapolate_lstsq, extrapolate_rank1, extrapolate_two_point
    from rlvrx.formulas import two_point_alpha
    from rlvrx.io.reader import Checkpoint
    from rlvrx.linearity.rank import write_rank1
    from rlvrx.trajectory import Trajectory

    traj = Trajectory.load(run)
    if target not in traj.steps or traj.get(target).kind not in ("base", "rl"):
        raise UsageError(f"--target {target}: the shoot-out predicts a real checkpoint of the run (steps: {traj.steps})")
    sources = [s for s in window_sources(run, window) if s.step < target]  # type: ignore[operator]
    if len(sources) < 2:
        raise UsageError(f"--window: needs at least 2 base/rl checkpoints before the target {target}, found {[s.step for s in sources]}")
    first, end = sources[0], sources[-1]
    alpha = two_point_alpha(first.step, end.step, target)  # type: ignore[arg-type]
    real = traj.path_of(target)
    if out.exists():
        if not options.overwrite:
            raise UsageError(f"{out} already exists; pass --overwrite to replace its predictions")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    weights = WeightsOptions(overwrite=True)
    paths = {}
    note(f"two-point from {first.step} and {end.step}, alpha {alpha:g}")
    paths["two-point"] = extrapolate_two_point(first, end, alpha, out / "two-point", target_step=target, options=weights).out
    paths["lstsq"] = extrapolate_lstsq(sources, target, out / "lstsq", options=weights).out
    paths["rank1"] = extrapolate_rank1(first, sources[1:], target, out / "rank1", rank=min(options.rank, len(sources) - 1), options=weights).out
    with Checkpoint(first.path) as base, Checkpoint(end.path) as current:
        write_rank1(base, current, out / "alpharl-end", overwrite=True)
    paths["alpharl"] = extrapolate_two_point(first, out / "alpharl-end", alpha, out / "alpharl", target_step=target, options=weights).out
    shutil.rmtree(out / "alpharl-end")
    rows = {name: {"path": str(path), **relative_error(path, real, end.path)} for name, path in paths.items()}
    return {
        "run": str(run),
        "target": target,
        "window_steps": [s.step for s in sources],
        "alpha": alpha,
        "rank": options.rank,
        "real": str(real),
        "window_end": str(end.path),
        "predictors": rows,
    }


def evaluate_all(result: dict, options: ShootoutOptions, note: Callable[[str], None] = lambda m: None) -> None:
    """Eval accuracy (avg over samples) of the real checkpoint, the window end and every prediction, into result."""
    from rlvrx.eval.model_spec import resolve_model
    from rlvrx.eval.options import EvalOptions
    from rlvrx.eval.runner import Evaluation
    from rlvrx.eval.summary import summarize_runs
    from rlvrx.tasks.registry import get_task

    assert options.task is not None
    task = get_task(options.task, **options.task_options)
    models = {"real": result["real"], "window-end": result["window_end"], **{k: v["path"] for k, v in result["predictors"].items()}}
    eval_dir = Path(result["predictors"]["two-point"]["path"]).parent / "eval"
    ev_options = EvalOptions(n=options.samples, limit=options.limit, device=options.device, seed=options.seed, overwrite=True)
    accuracy = {}
    with Evaluation(ev_options, note=note) as ev:
        for name, path in models.items():
            runs = ev.run(resolve_model(path, eval_dir, name), [task])
            accuracy[name] = summarize_runs(runs)[name][task.name]
    result["task"] = task.name
    result["accuracy"] = {name: {"avg": m.get("avg"), "avg_stderr": m.get("avg_stderr"), "problems": m.get("problems")} for name, m in accuracy.items()}
