"""Experiment trackers for training runs: the recipe's `logger:` list (or `--logger a,b`).

metrics.jsonl is always written (rlvrx.rundir, its own names); trackers receive each record under
verl's metric names where one exists, so one dashboard serves both backends. Offline by default:
tensorboard writes RUN/tensorboard, mlflow MLFLOW_TRACKING_URI when set, else the SQLite store RUN/mlflow.db
(mlflow's own default backend; its file store is in maintenance mode), wandb an offline run under RUN/wandb
unless WANDB_MODE or WANDB_API_KEY says otherwise, trackio its SQLite store RUN/trackio (rlvrx.train.trackers).
Each backend is imported only when named; a missing library is a one-line error naming the extra.

One run directory is one tracker run: RUN/tracking.json keeps each tracker's run id, so a resumed
`rlvrx train` / `rlvrx run` continues the same run, and the last step each tracker holds, so the steps a
resume recomputes (those after the last checkpoint) are not sent twice. `rlvrx run` adds each stage's
summary numbers (linearity, extrapolation, eval) to that run as summary/<stage>/<key>.
"""

from __future__ import annotations

import json
import math
import os
import typing
from typing import Iterable

from rlvrx.config import Recipe
from rlvrx.errors import UsageError
from rlvrx.io.atomic import atomic_write_text
from rlvrx.io.jsonio import read_json
from rlvrx.rundir import RunDir

LOGGERS: tuple[str, ...] = typing.get_args(typing.get_args(Recipe.model_fields["logger"].annotation)[0])

# rlvrx's metrics.jsonl keys -> verl's names (verl/trainer/ppo/metric_utils.py, dp_actor.py).
VERL_NAMES = {
    "reward_mean": "critic/score/mean",
    "reward_std": "critic/score/std",
    "accuracy": "critic/score/acc",
    "advantage_std": "critic/advantages/std",
    "frac_zero_std": "critic/score/frac_zero_std",
    "loss": "actor/pg_loss",
    "kl": "actor/kl_loss",
    "clip_fraction": "actor/pg_clipfrac",
    "entropy": "actor/entropy",
    "grad_norm": "actor/grad_norm",
    "lr": "actor/lr",
    "response_length": "response_length/mean",
    "step_time": "perf/time_per_step",
    "elapsed": "perf/elapsed_s",
    "grad_step": "training/grad_step",
    "step": "training/global_step",
}


def parse_loggers(value: str | Iterable[str]) -> list[str]:
    """'tensorboard,mlflow' or a list -> checked names, in order, without repeats."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in (str(i).strip().lower() for i in items):
        if not item:
            continue
        if item not in LOGGERS:
            raise UsageError(f"logger {item!r} is not one of {', '.join(LOGGERS)}")
        if item not in names:
            names.append(item)
    return names


def tracker_step(record: dict) -> int:
    """The x-axis of a record: the training step; an SFT warm-up record's SFT step."""
    return int(record["sft_step"] if record.get("stage") == "sft" else record.get("step", 0))


def _finite_number(value) -> bool:
    """A value a tracker can plot: an int or float (not a bool), finite."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def tracker_metrics(record: dict, task: str) -> dict[str, float]:
    """A metrics.jsonl record -> {verl name: value}: finite numbers only; test_accuracy is the greedy
    eval, verl's val-core/<task>/acc/mean@1; keys without a verl name keep theirs under rlvrx/. An SFT
    warm-up record's values go under sft/ (verl's SFT trainer names its loss train/loss)."""
    out: dict[str, float] = {}
    sft = record.get("stage") == "sft"
    for key, value in record.items():
        if not _finite_number(value):
            continue
        if sft:
            if key not in ("step", "sft_step"):
                out[f"sft/{key}"] = float(value)
            continue
        if key == "test_accuracy":
            name = f"val-core/{task}/acc/mean@1"
        else:
            name = VERL_NAMES.get(key, f"rlvrx/{key}")
        out[name] = float(value)
    return out


def summary_metrics(stage: str, summary: dict, limit: int = 200) -> dict[str, float]:
    """A stage's JSON summary -> {summary/<stage>/<key path>: value}: its finite numbers, nested dicts joined
    with '/', lists (per-step and per-tensor tables) left out; at most `limit` of them."""
    out: dict[str, float] = {}

    def walk(value, path: str) -> None:
        if len(out) >= limit:
            return
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}/{key}")
        elif _finite_number(value):
            out[path] = float(value)

    walk(summary, f"summary/{stage}")
    return out


class Tracker:
    """The named backends of one run directory: log(record) per training record, log_summary(stage,
    summary) for a stage's results, close() at the end. Reopens the tracker runs RUN/tracking.json names."""

    def __init__(self, names: list[str], run_dir: str | os.PathLike, project: str, run_name: str, task: str = "", config: dict | None = None):
        from rlvrx.train.trackers import BACKENDS

        self.task = task
        self.rundir = RunDir(run_dir)
        self.backends: dict = {}
        self.last: dict[str, dict[str, int]] = {}
        named = [name for name in names if name in BACKENDS]
        self.state: dict = self._read_state() if named else {}
        try:
            for name in named:
                saved = self.state.get(name, {})
                self.backends[name] = BACKENDS[name](self.rundir, project, run_name, config or {}, saved)
                self.last[name] = {axis: int(step) for axis, step in saved.get("last_step", {}).items()}
        except BaseException:
            self.close()
            raise
        if self.backends:
            self._save()

    def _read_state(self) -> dict:
        path = self.rundir.tracking
        if not path.is_file():
            return {}
        trackers = read_json(path, dict).get("trackers", {})
        return trackers if isinstance(trackers, dict) else {}

    def _save(self) -> None:
        for name, backend in self.backends.items():
            self.state[name] = {**backend.state, "last_step": self.last[name]}
        self.rundir.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.rundir.tracking, json.dumps({"trackers": self.state}, indent=2) + "\n")

    def log(self, record: dict) -> None:
        """One metrics.jsonl record, to every backend that does not hold its step yet (SFT and RL steps
        are separate axes)."""
        if not self.backends:
            return
        metrics = tracker_metrics(record, self.task)
        step = tracker_step(record)
        axis = "sft" if record.get("stage") == "sft" else "rl"
        sent = False
        for name, backend in self.backends.items():
            last = self.last[name].get(axis)
            if last is not None and step <= last:
                continue  # logged before this resume
            backend.log(metrics, step)
            self.last[name][axis] = step
            sent = True
        if sent:
            self._save()

    def log_summary(self, stage: str, summary: dict, step: int) -> dict[str, float]:
        """A stage's summary numbers as summary metrics (wandb: run.summary; the others: points at `step`)."""
        metrics = summary_metrics(stage, summary)
        if metrics:
            for backend in self.backends.values():
                backend.log_summary(metrics, step)
        return metrics

    def close(self) -> None:
        backends, self.backends = self.backends, {}
        for backend in backends.values():
            backend.close()


PROJECT = "rlvrx"


def run_name(run_dir: str | os.PathLike) -> str:
    """A run directory's tracker run name: its folder name (output.dir's)."""
    return RunDir(run_dir).root.resolve().name


def log_stage_summary(names: list[str], run_dir: str | os.PathLike, stage: str, summary: dict) -> dict[str, float]:
    """Add one `rlvrx run` stage's summary numbers to the run directory's tracker run, at its last training step."""
    if not any(name in LOGGERS and name != "console" for name in names):
        return {}
    steps = [int(r.get("step", 0)) for r in RunDir(run_dir).read_metrics() if r.get("stage") != "sft"]
    tracker = Tracker(names, run_dir, PROJECT, run_name(run_dir))
    try:
        return tracker.log_summary(stage, summary, max(steps, default=0))
    finally:
        tracker.close()
