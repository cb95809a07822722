"""Logits extrapolation: sample from l = l_base + alpha (l_second - l_base), both models decoding in
lockstep with their own KV caches (rlvrx.generation.ExtrapolatedSource), then temperature, top-p.

The output is a generations file in the format `rlvrx eval --generations` grades
(rlvrx.generation.generations: one line per problem with id, prompt, gold, completions, plus task,
finish_reason and num_tokens), a provenance file beside it (`<stem>.extrapolation.json`), and,
when the task has a verifier, pass@k / avg / maj@k computed right away (rlvrx.verify.records).

All prompts x k samples go to one `generate` call that decodes `batch_size` rows at a time; each
row's random stream is seeded from (seed, prompt index, sample index), so alpha = 0 (alpha = 1)
reproduces single-model sampling of the base (second) model token for token with the same seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from rlvrx.errors import ParameterError, UsageError
from rlvrx.hub import model_dir
from rlvrx.models import check_device

PROVENANCE_SUFFIX = ".extrapolation.json"

Note = Callable[[str], None]


@dataclass
class LogitsOptions:
    """None = the same defaults as `rlvrx eval` (temperature 0.6, top-p 0.95; n and length by device/task)."""

    k: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    seed: int = 0
    batch_size: int | None = None  # rows (problem x sample) decoded at once; None = 256
    device: str = "auto"
    dtype: str | None = None  # default: bfloat16 on GPU, float32 on CPU
    limit: int | None = None
    ids: Sequence[str] | str | None = None
    grade: bool = True
    workers: int | None = None
    k_list: Sequence[int] | None = None
    overwrite: bool = False

    def __post_init__(self):
        if self.device != "auto":
            check_device(self.device)


@dataclass
class LogitsExtrapolation:
    out: Path
    task: str
    alpha: float
    inputs: list[dict]
    target_step: int | None
    sampling: dict
    device: str
    dtype: str
    problems: int
    records: list[dict] = field(default_factory=list)
    generations: list = field(default_factory=list)  # rlvrx.generation.Generation, prompt-major
    metrics: dict | None = None  # summarize_records(...) when the task has a verifier
    seconds_generate: float = 0.0
    seconds_grade: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def provenance(self) -> dict:
        return {
            "method": "logits",
            "formula": "l = l_base + alpha * (l_second - l_base), then temperature, top-p, sample",
            "alpha": self.alpha,
            "target_step": self.target_step,
            "inputs": self.inputs,
            "task": self.task,
            "problems": self.problems,
            "sampling": self.sampling,
            "device": self.device,
            "dtype": self.dtype,
            "seconds_generate": round(self.seconds_generate, 3),
            "seconds_grade": round(self.seconds_grade, 3),
            "metrics": self.metrics,
        }

    def summary(self) -> dict:
        return {"out": str(self.out), **self.provenance(), "warnings": self.warnings}


# ----------------------------------------------------------------------------------------------
# Models


def check_same_tokenizer(a, b, path_a: str | os.PathLike, path_b: str | os.PathLike) -> None:
    """Both models must read and write the same token ids."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        for token, index in sorted(va.items(), key=lambda kv: kv[1]):
            if vb.get(token) != index:
                other = vb.get(token)
                where = f"id {other}" if other is not None else "no id"
                raise UsageError(
                    f"tokenizers differ: token {token!r} has id {index} in {path_a} but {where} in {path_b}; "
                    "logits extrapolation needs two checkpoints of the same model"
                )
        raise UsageError(f"tokenizers differ: {path_b} has {len(vb)} tokens, {path_a} has {len(va)}; use two checkpoints of the same model")
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(a, attr, None) != getattr(b, attr, None):
            raise UsageError(f"tokenizers differ: {attr} is {getattr(a, attr, None)} in {path_a} but {getattr(b, attr, None)} in {path_b}")


def load_pair(base_path: str | os.PathLike, second_path: str | os.PathLike, device: str = "cpu", dtype: str | None = None):
    """(base model, second model, tokenizer) on `device`, after checking the tokenizers agree."""
    from rlvrx.models import load_pretrained, resolve_dtype

    torch_dtype = resolve_dtype(dtype, device)
    base_model, tokenizer = load_pretrained(base_path, device, torch_dtype)
    second_model, second_tokenizer = load_pretrained(second_path, device, torch_dtype)
    check_same_tokenizer(tokenizer, second_tokenizer, base_path, second_path)
    return base_model.eval(), second_model.eval(), tokenizer


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_extrapolated(
    base_model,
    second_model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    alpha: float,
    n: int,
    params,
    batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    names: Sequence[str] | None = None,
):
    """`n` samples per prompt (token ids) from the extrapolated logits; Generation objects, prompt-major."""
    from rlvrx.generation import ExtrapolatedSource, generate

    source = ExtrapolatedSource(base_model, second_model, alpha)
    if source.max_positions is not None:
        for i, ids in enumerate(prompts):
            if len(ids) >= source.max_positions:
                label = names[i] if names is not None else f"prompt {i}"
                raise ParameterError(
                    "problem {label}: its prompt has {tokens} tokens, leaving no room in the model context of "
                    "{positions} positions; drop it ({ids} / {limit}) or use a model with a longer context",
                    "ids",
                    "limit",
                    label=label,
                    tokens=len(ids),
                    positions=source.max_positions,
                )
    return generate(source, tokenizer, prompts, n=n, params=params, batch_size=batch_size, progress=progress)


def records_from_generations(task, examples, generations) -> list[dict]:
    """One generations-file record per problem (rlvrx.generation.generations format)."""
    from rlvrx.generation.generations import generation_record, group_generations

    completions, extras = group_generations(generations, len(examples))
    return [generation_record(e.id, e.prompt, e.answer, completions[i], task=task.name, **extras[i]) for i, e in enumerate(examples)]


def grade_records(task, examples, records: list[dict], workers: int | None = None, k_list: Sequence[int] | None = None) -> dict:
    """pass@k / avg / maj@k of the records under the task's verifier (grading in worker processes)."""
    from rlvrx.generation.generations import graded_record
    from rlvrx.verify.records import grade_completions, grading_pool, summarize_records

    completions = [record["completions"] for record in records]
    verdicts = [[None] * len(c) for c in completions]
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(grading_pool(workers)) if task.grading_kind is not None else None
        with contextlib.closing(grade_completions(task, examples, completions, pool)) as stream:
            for p, j, verdict in stream:
                verdicts[p][j] = verdict
    graded = [graded_record(e, c, v, {}) for e, c, v in zip(examples, completions, verdicts)]
    return summarize_records(graded, k_list)


# ----------------------------------------------------------------------------------------------
# The command


def default_output(run: str | os.PathLike, base: int, second: int, target: int | None, alpha: float, task: str) -> Path:
    """RUN/extrapolated/logits-s<S0>-s<S1>-t<T>/<task>.jsonl (a<alpha> without a target step)."""
    from rlvrx.rundir import RunDir

    label = f"t{target}" if target is not None else f"a{alpha:g}"
    return RunDir(run).extrapolated_generations(base, second, label, task)


def _resolve_inputs(run, base, second, target, alpha, base_path, second_path):
    """(base path, second path, base step, second step, target, alpha) from the flags."""
    from rlvrx.extrapolate.inputs import resolve_alpha

    if (base_path is None) != (second_path is None):
        if alpha is not None:
            raise ParameterError("{alpha} needs two checkpoints: give both {base_path} and {second_path}", "alpha", "base_path", "second_path")
        raise ParameterError("give both {base_path} and {second_path} (two model directories), or neither", "base_path", "second_path")
    if base_path is None:
        if run is None:
            raise ParameterError("give {run} with {base:S0} {second:S1}, or {base_path}/{second_path}", "run", "base", "second", "base_path", "second_path")
        if base is None or second is None:
            if alpha is not None:
                raise ParameterError("{alpha} needs two checkpoints: give both {base:S0} and {second:S1}", "alpha", "base", "second")
            raise ParameterError("logits extrapolation needs two checkpoints: give {base:S0} and {second:S1}", "base", "second")
        from rlvrx.trajectory import Trajectory

        traj = Trajectory.load(run)
        base_path, second_path = traj.path_of(base), traj.path_of(second)
    alpha, target = resolve_alpha(base, second, target, alpha)
    base_path, second_path = model_dir(base_path), model_dir(second_path)
    if Path(base_path).resolve() == Path(second_path).resolve():
        raise ParameterError("{alpha} needs two different checkpoints; both are {path}", "alpha", path=base_path)
    return Path(base_path), Path(second_path), base, second, target, float(alpha)


def extrapolate_logits(
    run: str | os.PathLike | None = None,
    *,
    task: str,
    base: int | None = None,
    second: int | None = None,
    target: int | None = None,
    alpha: float | None = None,
    base_path: str | os.PathLike | None = None,
    second_path: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    task_options: dict | None = None,
    options: LogitsOptions | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    note: Note | None = None,
) -> LogitsExtrapolation:
    """The `rlvrx extrapolate logits` request: sample k completions per problem of TASK from the
    logits-extrapolated pair, write the generations file, grade it when the task has a verifier.

    progress(stage, done, total) with stage "generate" (rows) or "grade"; note(message) for warnings.
    """
    from rlvrx.io.atomic import atomic_write_text
    from rlvrx.tasks.datasets import select_examples
    from rlvrx.formulas import interpolation_warning
    from rlvrx.generation.generations import write_generations
    from rlvrx.generation.params import resolve_sampling
    from rlvrx.models import check_weights, resolve_device
    from rlvrx.tasks.build import build_tasks, has_verifier, task_max_new_tokens

    options = options or LogitsOptions()
    note = note or (lambda message: None)
    base_path, second_path, base, second, target, alpha = _resolve_inputs(run, base, second, target, alpha, base_path, second_path)
    for path in (base_path, second_path):
        check_weights(path)
    tasks = build_tasks([task] if task else [], data=data, data_dir=data_dir, options=task_options)
    if len(tasks) != 1:
        raise ParameterError("give one task: {task:NAME} or {data:FILE}", "task", "data")
    the_task = tasks[0]
    if out is None:
        if run is None or base is None:
            raise ParameterError("give {out:DIR} (the default RUN/extrapolated/logits-s<S0>-s<S1>-t<T>/ needs {run} and steps)", "out", "run")
        out = default_output(run, base, second, target, alpha, the_task.name)
    else:
        if Path(out).is_file():
            raise UsageError(f"--out is a directory (it receives <task>.jsonl); {out} is a file")
        out = Path(out) / f"{the_task.name}.jsonl"
    out = Path(out)
    if out.exists() and not options.overwrite:
        raise ParameterError("{path} already exists; pass {overwrite} to replace it", "overwrite=True", path=out)

    warnings = []
    message = interpolation_warning("two-point", [base, second], target, alpha)
    if message:
        warnings.append(message)
        note(message)

    device = str(resolve_device(options.device))
    gpu = device.startswith("cuda")
    sampling = resolve_sampling(
        gpu=gpu,
        task_name=the_task.name,
        task_max_new_tokens=task_max_new_tokens(the_task),
        n=options.k,
        temperature=options.temperature,
        top_p=options.top_p,
        max_new_tokens=options.max_new_tokens,
        seed=options.seed,
    )
    examples = select_examples(the_task.test_examples(), limit=options.limit, ids=options.ids, source=the_task.name)
    if not examples:
        raise UsageError(f"task {the_task.name!r} has no test problems to sample")

    base_model, second_model, tokenizer = load_pair(base_path, second_path, device, options.dtype)
    dtype_name = str(next(base_model.parameters()).dtype).removeprefix("torch.")
    prompts = [the_task.encode_prompt(e, tokenizer) for e in examples]
    params = sampling.params()
    total_rows = len(prompts) * sampling.n
    done = [0]

    def advance(k: int) -> None:
        done[0] += k
        if progress is not None:
            progress("generate", done[0], total_rows)

    began = time.perf_counter()
    generations = sample_extrapolated(
        base_model,
        second_model,
        tokenizer,
        prompts,
        alpha,
        sampling.n,
        params,
        batch_size=options.batch_size or 256,
        progress=advance,
        names=[e.id for e in examples],
    )
    seconds_generate = time.perf_counter() - began
    del base_model, second_model

    records = records_from_generations(the_task, examples, generations)
    inputs = [
        {"role": "base", "step": base, "path": str(base_path.resolve())},
        {"role": "second", "step": second, "path": str(second_path.resolve())},
    ]
    result = LogitsExtrapolation(
        out=out,
        task=the_task.name,
        alpha=alpha,
        inputs=inputs,
        target_step=target,
        sampling=sampling.key(),
        device=device,
        dtype=dtype_name,
        problems=len(examples),
        records=records,
        generations=generations,
        seconds_generate=seconds_generate,
        warnings=warnings,
    )
    write_generations(out, records)
    if options.grade and has_verifier(the_task):
        began = time.perf_counter()
        if progress is not None:
            progress("grade", 0, total_rows)
        result.metrics = grade_records(the_task, examples, records, options.workers, options.k_list)
        result.seconds_grade = time.perf_counter() - began
    atomic_write_text(out.with_name(out.stem + PROVENANCE_SUFFIX), json.dumps(result.provenance(), indent=2) + "\n")
    return result
