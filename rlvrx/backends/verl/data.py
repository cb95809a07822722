"""A task -> verl's RL parquet format, one row per prompt.

Columns (what verl's RLHFDataset and reward loop read):
  data_source   "rlvrx/<task name>"; verl groups validation metrics by it
  prompt        chat messages [{"role": "user", "content": ...}]; verl applies the model's chat template
  ability       the task's grading kind ("math", "arithmetic", ...)
  reward_model  {"style": "rule", "ground_truth": gold answer}
  extra_info    {"split", "index", "id", "question", "task", "task_options"}: enough for
                rlvrx.backends.verl.reward to rebuild the task and its verifier in a reward worker
                (task_options is JSON text, so parquet keeps it exactly).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlvrx.backends.verl.overrides import DataFiles
from rlvrx.errors import UsageError

TRAIN_FILE = "train.parquet"
VAL_FILE = "val.parquet"


def task_spec(recipe) -> tuple[str, dict]:
    """(task name, options) from the recipe's task section: the fields the task accepts, unset ones left out."""
    from rlvrx.tasks import task_options

    cfg = recipe.task
    options = {k: v for k, v in cfg.model_dump(exclude={"name"}).items() if v is not None}
    accepted = task_options(cfg.name)
    if accepted is not None:
        options = {k: v for k, v in options.items() if k in accepted}
    return cfg.name, options


def prompt_content(task, example) -> str:
    """The user turn: the task's message before any chat template."""
    if hasattr(task, "user_message"):
        return task.user_message(example)
    return task.format_prompt(example, None)


def verl_rows(task, examples, split: str, task_name: str, options: dict) -> list[dict]:
    options_json = json.dumps(options, sort_keys=True)
    ability = task.grading_kind or "custom"
    return [
        {
            "data_source": f"rlvrx/{task_name}",
            "prompt": [{"role": "user", "content": prompt_content(task, ex)}],
            "ability": ability,
            "reward_model": {"style": "rule", "ground_truth": str(ex.answer)},
            "extra_info": {
                "split": split,
                "index": i,
                "id": str(ex.id),
                "question": str(ex.prompt),
                "task": task_name,
                "task_options": options_json,
            },
        }
        for i, ex in enumerate(examples)
    ]


def write_parquet(rows: list[dict], path: Path) -> Path:
    """Write rows atomically (tmp file + rename)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("writing verl data needs pyarrow: pip install pyarrow (or 'rlvrx[data]')") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_verl_data(recipe, out_dir: str | os.PathLike) -> DataFiles:
    """Write the recipe's task as RUN/verl_data/{train,val}.parquet; the test split is the val set."""
    from rlvrx.tasks import get_task

    name, options = task_spec(recipe)
    task = get_task(name, **options)
    train, test = list(task.train_examples()), list(task.test_examples())
    if not train:
        raise UsageError(f"task {name!r} yields no training prompts; check the task section (n_train, data, limit)")
    if not test:
        raise UsageError(f"task {name!r} yields no test prompts, and verl needs a validation set; check task.n_test / data")
    out_dir = Path(out_dir)
    train_path = write_parquet(verl_rows(task, train, "train", name, options), out_dir / TRAIN_FILE)
    val_path = write_parquet(verl_rows(task, test, "test", name, options), out_dir / VAL_FILE)
    return DataFiles(train=train_path.resolve(), val=val_path.resolve(), n_train=len(train), n_val=len(test))
