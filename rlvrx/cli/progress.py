"""A rich progress bar for SFT and GRPO that shows the latest loss / reward (a rlvrx.train.trainer.TrainingProgress)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlvrx.cli.common import err_console


class TrainProgress:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            disable=not enabled,
            transient=False,
        )
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start(self, description: str, total: int, completed: int = 0) -> None:
        if self.task is not None:
            self.progress.stop_task(self.task)
        self.task = self.progress.add_task(description, total=total, completed=completed, info="")

    def sft_update(self, record: dict) -> None:
        self.progress.update(self.task, advance=1, info=f"loss {record['loss']:.3f}")

    def grpo_update(self, record: dict) -> None:
        info = f"reward {record['reward_mean']:.3f}"
        if "test_accuracy" in record:
            info += f" test acc {record['test_accuracy']:.3f}"
        self.progress.update(self.task, completed=record["grad_step"], info=info)
