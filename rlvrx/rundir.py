"""A run directory (`runs/NAME/`): the one place that spells the paths inside it.

    recipe.yaml                 the resolved recipe, for provenance
    trajectory.json             the checkpoint manifest (rlvrx.trajectory)
    checkpoints/step_NNNNNN/    HF checkpoint dirs
    metrics.jsonl               one JSON object per training step (read and written only here)
    stages/NAME.json, .done     `rlvrx run`'s stage summaries and markers
    linearity/{weights,logprobs}/   the linearity analyses (summary.json, PNGs, CSVs)
    extrapolated/  eval/  report/  compare.png
    verl_checkpoints/  verl_data/  base_model/   the verl backend's folders
    tracking.json               the experiment trackers' run ids and last logged steps (rlvrx.train.tracking)
    tensorboard/  mlflow.db  wandb/  trackio/     the trackers' local stores (`logger:`)

The metrics log is appended as training goes. A process killed mid-append leaves a torn last line;
the reader drops it (the step is recomputed on resume), while damage anywhere else is a one-line
error naming the file and line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlvrx.io.atomic import atomic_write_text
from rlvrx.errors import UsageError
from rlvrx.io.jsonio import iter_jsonl
from rlvrx.trajectory import MANIFEST, step_dir_name

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
COMPARE_PNG = "compare.png"
LINEARITY_KINDS = ("weights", "logprobs")
RANK_KIND = "rank"  # RUN/linearity/rank: the rank-1 diagnostics (not an R² analysis like the kinds above)
# Fields the metrics readers compute with: when present they must be numbers (test_accuracy may be NaN/null).
NUMERIC = ("step", "grad_step", "elapsed", "test_accuracy", "reward_mean", "accuracy", "loss", "kl", "entropy", "grad_norm", "lr")


class RunDir:
    """The paths of one run directory, and its metrics log."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # -- paths ----------------------------------------------------------------------------------

    @property
    def recipe(self) -> Path:
        return self.root / RECIPE

    @property
    def trajectory(self) -> Path:
        return self.root / MANIFEST

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_dir_name(step)

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    def stage_summary(self, name: str) -> Path:
        return self.stages / f"{name}.json"

    def stage_marker(self, name: str) -> Path:
        return self.stages / f"{name}.done"

    def linearity(self, kind: str) -> Path:
        """RUN/linearity/KIND (weights, logprobs or rank)."""
        if kind not in (*LINEARITY_KINDS, RANK_KIND):
            raise ValueError(f"kind must be one of {', '.join((*LINEARITY_KINDS, RANK_KIND))}, got {kind!r}")
        return self.root / "linearity" / kind

    def linearity_summary(self, kind: str) -> Path:
        return self.linearity(kind) / "summary.json"

    def linearity_parts_json(self, kind: str) -> Path:
        """RUN/linearity/KIND.json: the merged summary of a sharded analysis."""
        return self.root / "linearity" / f"{kind}.json"

    @property
    def extrapolated(self) -> Path:
        return self.root / "extrapolated"

    def extrapolated_checkpoint(self, step: int) -> Path:
        """RUN/extrapolated/step_NNNNNN: `rlvrx extrapolate weights`' default output."""
        return self.extrapolated / step_dir_name(step)

    def extrapolated_generations(self, base: int, second: int, label: str, task: str) -> Path:
        """RUN/extrapolated/logits-s<S0>-s<S1>-<label>/<task>.jsonl: `rlvrx extrapolate logits`' default output
        (`rlvrx eval --generations` names the model after the folder and finds the task from the file name)."""
        return self.extrapolated / f"logits-s{base}-s{second}-{label}" / f"{task}.jsonl"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.root / "report"

    # -- the verl backend's own folders ---------------------------------------------------------

    @property
    def verl_checkpoints(self) -> Path:
        """verl's checkpoint tree (global_step_N/actor/...); the HF exports are registered in the trajectory."""
        return self.root / "verl_checkpoints"

    @property
    def verl_data(self) -> Path:
        """The parquet files verl reads (the recipe's task, written by rlvrx)."""
        return self.root / "verl_data"

    @property
    def base_model(self) -> Path:
        """The model verl starts from, saved as an HF directory (a recipe's model.tiny is built here)."""
        return self.root / "base_model"

    @property
    def compare_png(self) -> Path:
        return self.root / COMPARE_PNG

    # -- experiment trackers (rlvrx.train.tracking) --------------------------------------------

    @property
    def tracking(self) -> Path:
        """RUN/tracking.json: each tracker's run id and last logged steps, so a resumed run continues the same tracker run."""
        return self.root / "tracking.json"

    def tracker_store(self, name: str) -> Path:
        """Where a tracker writes inside the run directory: RUN/tensorboard, RUN/mlflow.db (its SQLite store),
        RUN/wandb (wandb's offline-run-* folders) or RUN/trackio (its SQLite database)."""
        stores = {"tensorboard": "tensorboard", "mlflow": "mlflow.db", "wandb": "wandb", "trackio": "trackio"}
        if name not in stores:
            raise ValueError(f"name must be one of {', '.join(stores)}, got {name!r}")
        return self.root / stores[name]

    # -- the metrics log: the one reader and the one writer -------------------------------------

    def read_metrics(self) -> list[dict]:
        """The run's metric records in log order ([] when it has no metrics.jsonl)."""
        path = self.metrics
        if not path.is_file():
            return []
        records = []
        for line, record in iter_jsonl(path, torn_tail="drop"):
            for key in NUMERIC:
                value = record.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise UsageError(f"{path}:{line}: {key} must be a number, found {value!r}")
            if not isinstance(record.get("step", 0), int):
                raise UsageError(f"{path}:{line}: step must be an integer, found {record['step']!r}")
            records.append(record)
        return records

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines past `after_step` (a resume recomputes them), and a torn last line."""
        if not self.metrics.is_file():
            return
        keep = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in keep))

    def clear_metrics(self) -> None:
        if self.metrics.exists():
            self.metrics.unlink()
