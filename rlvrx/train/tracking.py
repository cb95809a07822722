"""Experiment trackers for training runs: the recipe's `logger:` list (or `--logger a,b`).

metrics.jsonl is always written (rlvrx.rundir, its own names); trackers receive each record under
verl's metric names where one exists, so one dashboard serves both backends. Offline by default:
tensorboard writes RUN/tensorboard, mlflow MLFLOW_TRACKING_URI when set, else the SQLite store RUN/mlflow.db
(mlflow's own default backend; its file store is in maintenance mode).
Each backend is imported only when named; a missing library is a one-line error naming the extra.
"""

from __future__ import annotations

import math
import os
import time
import typing
from pathlib import Path
from typing import Iterable

from rlvrx.config import Recipe
from rlvrx.errors import UsageError

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


def tracker_metrics(record: dict, task: str) -> dict[str, float]:
    """A metrics.jsonl record -> {verl name: value}: finite numbers only; test_accuracy is the greedy
    eval, verl's val-core/<task>/acc/mean@1; keys without a verl name keep theirs under rlvrx/. An SFT
    warm-up record's values go under sft/ (verl's SFT trainer names its loss train/loss)."""
    out: dict[str, float] = {}
    sft = record.get("stage") == "sft"
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
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


class Tracker:
    """The named backends of one run: log(record) per training record, close() at the end."""

    def __init__(self, names: list[str], run_dir: str | os.PathLike, project: str, run_name: str, task: str, config: dict | None = None):
        self.task = task
        self.backends: list = []
        run_dir = Path(run_dir)
        for name in names:
            if name == "tensorboard":
                self.backends.append(_TensorBoard(run_dir / "tensorboard"))
            elif name == "mlflow":
                self.backends.append(_MLflow(run_dir / "mlflow.db", project, run_name, config or {}))

    def log(self, record: dict) -> None:
        if not self.backends:
            return
        metrics = tracker_metrics(record, self.task)
        step = tracker_step(record)
        for backend in self.backends:
            backend.log(metrics, step)

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def _missing(library: str) -> UsageError:
    return UsageError(f"logger needs {library}: pip install 'rlvrx[tracking]'")


class _TensorBoard:
    def __init__(self, logdir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(logdir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, store: Path, project: str, run_name: str, config: dict):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise _missing("mlflow") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store.resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(project)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for key, value in list(config.items())[:100]:
            self.client.log_param(self.run_id, key, str(value)[:500])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # mlflow refuses '@' in names; verl's mlflow adapter writes it as '_at_' (mean@1 -> mean_at_1)
        batch = [Metric(key=name.replace("@", "_at_"), value=value, timestamp=now, step=step) for name, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
