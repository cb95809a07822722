"""The tracker backends behind rlvrx.train.tracking.Tracker, one class per library, each imported only when named.

Every backend takes the run directory, the project and run names, the run's config and what it saved
last time (`saved`, from RUN/tracking.json), and offers log(metrics, step), log_summary(metrics, step),
close() and `state` (what to save for the next process: the ids that reopen the same tracker run).
Offline by default: nothing leaves the machine unless the user configured it (MLFLOW_TRACKING_URI,
WANDB_MODE or WANDB_API_KEY, trackio's TRACKIO_SPACE_ID / TRACKIO_SERVER_URL).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from pathlib import Path

from rlvrx.errors import UsageError
from rlvrx.rundir import RunDir


def missing(library: str) -> UsageError:
    return UsageError(f"logger needs {library}: pip install 'rlvrx[tracking]'")


class TensorBoard:
    """RUN/tensorboard: one events file per process; steps already logged are never sent again (Tracker)."""

    def __init__(self, rundir: RunDir, project: str, run_name: str, config: dict, saved: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing("tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(rundir.tracker_store("tensorboard")))
        self.state: dict = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()

    log_summary = log

    def close(self) -> None:
        self.writer.close()


class MLflow:
    """MLFLOW_TRACKING_URI when set, else the SQLite store RUN/mlflow.db; the run id is kept, so a resume
    (same tracking URI) reopens the same mlflow run."""

    def __init__(self, rundir: RunDir, project: str, run_name: str, config: dict, saved: dict):
        try:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException
        except ImportError:
            raise missing("mlflow") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{rundir.tracker_store('mlflow').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        run_id = saved.get("run_id") if saved.get("tracking_uri") == uri else None
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException:  # deleted, or another store
                run_id = None
        if run_id is None:
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(project)
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            for key, value in list(config.items())[:100]:
                self.client.log_param(run_id, key, str(value)[:500])
        self.run_id = run_id
        self.state = {"tracking_uri": uri, "run_id": run_id}

    @staticmethod
    def key(name: str) -> str:
        """mlflow refuses '@' (verl's mlflow adapter writes it as '_at_': mean@1 -> mean_at_1) and most punctuation."""
        return re.sub(r"[^\w\-. /]", "_", name.replace("@", "_at_"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key=self.key(name), value=value, timestamp=now, step=step) for name, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    log_summary = log

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    """wandb offline (RUN/wandb/offline-run-*; `wandb sync` uploads them) unless WANDB_MODE or WANDB_API_KEY
    is set. The run id is kept and reopened with resume="allow"; each process writes its own offline-run
    folder of that id, which `wandb sync` joins into one run. Training metrics are plotted against
    training/global_step, SFT ones against sft/step; stage summaries go to run.summary."""

    def __init__(self, rundir: RunDir, project: str, run_name: str, config: dict, saved: dict):
        try:
            import wandb
        except ImportError:
            raise missing("wandb") from None
        store = rundir.tracker_store("wandb")
        store.mkdir(parents=True, exist_ok=True)
        configured = os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")
        settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False)
        self.run = wandb.init(
            project=project,
            name=run_name,
            id=saved.get("id"),
            resume="allow",
            dir=str(store.parent),  # wandb writes DIR/wandb/
            mode=None if configured else "offline",
            config=config,
            settings=settings,
            reinit="create_new",
        )
        self.run.define_metric("training/global_step")
        self.run.define_metric("sft/step")
        self.run.define_metric("sft/*", step_metric="sft/step")
        self.run.define_metric("*", step_metric="training/global_step")
        self.state = {"id": self.run.id}

    def log(self, metrics: dict[str, float], step: int) -> None:
        axis = "sft/step" if any(name.startswith("sft/") for name in metrics) else "training/global_step"
        self.run.log({**metrics, axis: step})

    def log_summary(self, metrics: dict[str, float], step: int) -> None:
        self.run.summary.update(metrics)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    """trackio's local SQLite store RUN/trackio/<project>.db; the run is reopened by name (resume="allow").

    trackio reads its directory once, from TRACKIO_DIR, into module constants at import: the variable is
    set only around that import, and the constants point at this run directory while the run is open
    (and back afterwards), so one process can track several run directories."""

    _DIRS = {"TRACKIO_DIR": "", "MEDIA_DIR": "media", "ARTIFACTS_DIR": "artifacts"}

    def __init__(self, rundir: RunDir, project: str, run_name: str, config: dict, saved: dict):
        store = rundir.tracker_store("trackio").resolve()
        trackio = self._import(store)
        self.trackio = trackio
        self._restore = self._point_at(store)
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # its banner and dashboard hints
                self.run = trackio.init(project=project, name=run_name, resume="allow", config=config, embed=False, auto_log_cpu=False, auto_log_gpu=False)
        except BaseException:
            self._restore()
            raise
        self.state = {"project": project, "name": run_name}

    @staticmethod
    def _import(store: Path):
        before = os.environ.get("TRACKIO_DIR")
        os.environ["TRACKIO_DIR"] = str(store)  # read by trackio.utils at its first import only
        try:
            import trackio
        except ImportError:
            raise missing("trackio") from None
        finally:
            if before is None:
                os.environ.pop("TRACKIO_DIR", None)
            else:
                os.environ["TRACKIO_DIR"] = before
        return trackio

    def _point_at(self, store: Path):
        """Point trackio's directory constants (in every trackio module that copied them) at `store`; return the undo."""
        modules = [m for name, m in list(sys.modules.items()) if m is not None and (name == "trackio" or name.startswith("trackio."))]
        utils = sys.modules["trackio.utils"]
        old = {attr: getattr(utils, attr) for attr in self._DIRS}
        changed = []
        for module in modules:
            for attr, sub in self._DIRS.items():
                if getattr(module, attr, None) == old[attr]:
                    setattr(module, attr, store / sub if sub else store)
                    changed.append((module, attr))

        def undo() -> None:
            for module, attr in changed:
                setattr(module, attr, old[attr])

        return undo

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    log_summary = log  # trackio has no run summary: the summary values are points at the run's last step

    def close(self) -> None:
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                self.trackio.finish()
        finally:
            self._restore()


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB, "trackio": Trackio}
