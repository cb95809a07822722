"""Evaluation runs: sample completions from models (or read a generations file), grade them in the
worker pool, stream one result line per finished problem, summarize pass@k / avg / maj@k.

Layout: the results of model M on task T go to `<out>/<M>/<T>.jsonl` (graded records, see
rlvrx.generation.generations) with the sampling settings beside them in `<T>.settings.json`. Problems are
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
sha256 (rlvrx.io.identity.checkpoint_sha256), so results of another model at the same path are never
resumed.

Sampling defaults: rlvrx.generation.params (the paper's on a GPU, small ones on CPU); engines:
rlvrx.generation.engines; the models and files evaluated: rlvrx.eval.model_spec; summaries:
rlvrx.eval.summary.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

from rlvrx.errors import ParameterError, UsageError
from rlvrx.eval.model_spec import ModelSpec, safe_name
from rlvrx.eval.options import EvalOptions, parse_ids, sampling_for
from rlvrx.eval.output import EvalOutput, check_settings, write_settings
from rlvrx.eval.summary import load_results
from rlvrx.generation.engines import engine_device, load_engine, require_vllm_engine, resolve_engine
from rlvrx.generation.generations import graded_record, group_generations, read_generations
from rlvrx.generation.params import Sampling
from rlvrx.models import check_device
from rlvrx.tasks.base import Example, Task
from rlvrx.tasks.build import grading_task
from rlvrx.verify.records import grade_completions, grading_pool

__all__ = ["EvalProgress", "Evaluation", "TaskRun", "problem_key"]


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
        self.options = options or EvalOptions()
        self.progress = progress or _NoProgress()
        self.note = note or (lambda message: None)
        self.ids = parse_ids(self.options.ids)
        self.gold_key = gold_key
        self.pool = grading_pool(self.options.workers, self.options.grading_timeout)
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
        from rlvrx.tasks.datasets import select_examples

        return select_examples(examples, limit=self.options.limit, ids=self.ids, source=source)

    # -- models -------------------------------------------------------------------------------

    def run(self, spec: ModelSpec, tasks: Sequence[Task] = (), task_options: dict | None = None) -> list[TaskRun]:
        """Evaluate one model (or grade one generations file) on the tasks; returns one TaskRun per task."""
        if spec.generations is not None:
            return [self.run_generations(spec, tasks, task_options)]
        engine_name = resolve_engine(self.options.engine, self.options.device)
        if engine_name == "vllm":
            require_vllm_engine()
        device = engine_device(self.options.device, engine_name)
        if engine_name == "hf":
            check_device(device)
        gpu = device.startswith("cuda")
        from rlvrx.io.identity import checkpoint_sha256

        model_sha256 = checkpoint_sha256(spec.path)
        engine = None
        runs = []
        try:
            for task in tasks:
                examples = self._select(task.test_examples(), task.name)
                sampling = sampling_for(task, self.options, gpu)
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
        o = self.options
        return load_engine(
            engine_name,
            path,
            device,
            o.dtype,
            max_rows=o.max_rows,
            tensor_parallel_size=o.tensor_parallel_size,
            seed=o.seed,
            gpu_memory_utilization=o.gpu_memory_utilization,
            max_model_len=o.max_model_len,
        )

    def _open_results(self, spec: ModelSpec, task_name: str, settings: dict) -> EvalOutput:
        """The (model, task) output, locked; with --overwrite a fresh one that replaces the old on commit."""
        results = EvalOutput(spec.out_dir, safe_name(task_name), self.options.overwrite).open()
        try:
            if results.finished:
                check_settings(results.settings_path, settings, results)
            settings_path = results.writing_settings_path
            if not settings_path.is_file() or not results.finished:
                write_settings(settings_path, {**settings, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        except BaseException:
            results.close()
            raise
        return results

    @staticmethod
    def _check_finished(record: dict, example: Example, n: int | None, path: Path) -> None:
        if record.get("gold") != example.answer or record.get("prompt") != example.prompt:
            raise ParameterError(
                "{path}: the finished record {id!r} is for a different problem (prompt or gold answer differ); "
                "pass {overwrite} to start over, or {out:DIR} to write elsewhere",
                "overwrite=True",
                "out",
                path=path,
                id=example.id,
            )
        if n is not None and len(record["completions"]) != n:
            raise ParameterError(
                "{path}: record {id!r} has {samples} samples, this run asks for {n}; pass {overwrite} to start over, or {out:DIR}",
                "overwrite=True",
                "out",
                path=path,
                id=example.id,
                samples=len(record["completions"]),
                n=n,
            )

    def _generate_and_grade(self, engine, task: Task, todo: list[Example], sampling: Sampling, results: EvalOutput, run: TaskRun, label: str) -> None:
        batch = self.options.batch_size or (64 if engine.name == "vllm" else max(1, min(16, 256 // sampling.n)))
        self.progress.start("generate", f"generating {label}", len(todo) * sampling.n)
        self.progress.start("grade", f"grading {label}", len(todo) * sampling.n)
        pending = None
        try:
            for start in range(0, len(todo), batch):
                examples = todo[start : start + batch]
                params = sampling.params()
                prompts = [task.encode_prompt(e, engine.tokenizer) for e in examples]
                keys = [problem_key(e.id) for e in examples]
                began = time.perf_counter()
                generations = engine.generate(prompts, sampling.n, params, lambda k: self.progress.advance("generate", k), keys)
                run.seconds_generate += time.perf_counter() - began
                completions, extras = group_generations(generations, len(examples))
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
        written = 0

        def flush_ready() -> None:
            nonlocal written
            while written < len(examples) and remaining[written] == 0:
                results.append(graded_record(examples[written], completions[written], verdicts[written], extras[written]))
                written += 1

        flush_ready()  # problems without completions (none in practice)
        stream = grade_completions(task, examples, completions, self.pool)
        try:
            for p, j, verdict in stream:
                verdicts[p][j] = verdict
                remaining[p] -= 1
                self.progress.advance("grade", 1)
                flush_ready()
                if self._stop.is_set():
                    break
        finally:
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
                raise ParameterError("{error}; to grade it, write the grades elsewhere with {out:DIR}", "out", error=e) from None
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
                        raise ParameterError(
                            "{path}: the graded completions of {id!r} differ from those in {source}; pass {overwrite} to grade again",
                            "overwrite=True",
                            path=results.path,
                            id=example.id,
                            source=source,
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
            from rlvrx.io.jsonio import iter_jsonl

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
                    f"{spec.generations}: which task's problems does it hold? name it <task>.jsonl, or evaluate it in a command with a single --task"
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
