"""`rlvrx extrapolate weights|logits`: predict future models from earlier checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from rlvrx.cli.args import parse_k_list, parse_size, parse_window
from rlvrx.cli.common import console, task_options, warn, write_json
from rlvrx.errors import UsageError

app = typer.Typer(no_args_is_help=True)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _progress_bar(label: str):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


@app.command()
def weights(
    run: Optional[Path] = typer.Argument(None, help="Run directory with trajectory.json (not needed with --base-path/--second-path)."),
    base: Optional[int] = typer.Option(None, "--base", help="Step S0 of the base (earlier) checkpoint."),
    second: Optional[int] = typer.Option(None, "--second", help="Step S1 of the second (later) checkpoint."),
    target: Optional[int] = typer.Option(None, "--target", help="Step T to predict; alpha = (T - S0) / (S1 - S0)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Explicit alpha instead of --target (needed for two bare model dirs)."),
    base_path: Optional[Path] = typer.Option(None, "--base-path", help="Base model directory or hub id org/name[@revision] (instead of a step of RUN)."),
    second_path: Optional[Path] = typer.Option(None, "--second-path", help="Second model directory or hub id org/name[@revision] (instead of a step of RUN)."),
    fit: str = typer.Option(
        "two-point",
        "--fit",
        help="two-point; lstsq: each parameter's least-squares line through every checkpoint in --window; rank1: per tensor, "
        "the top singular direction in time of the drifts from --base over --window, its coefficient extrapolated along a line (RELEX).",
    ),
    window: Optional[str] = typer.Option(None, "--window", help="A:B, the steps --fit lstsq/rank1 uses (inclusive; either side may be empty)."),
    rank: int = typer.Option(1, "--rank", help="--fit rank1: number of temporal components, each with its own line.", min=1),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output checkpoint directory (default: RUN/extrapolated/step_T; --alpha without --target needs --out)."
    ),
    copy_pattern: Optional[List[str]] = typer.Option(
        None, "--copy-pattern", help="Name substring of tensors copied from the latest checkpoint (repeatable; default: norm, layernorm, rmsnorm, ln_)."
    ),
    extrapolate_all: bool = typer.Option(False, "--all", help="Extrapolate norm weights too (non-floating tensors are always copied)."),
    precise: bool = typer.Option(False, "--precise", help="Float64 arithmetic instead of float32."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype of floating tensors (default: the inputs')."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB."),
    register: bool = typer.Option(False, "--register", help="Record the result in RUN/trajectory.json as kind extrapolated at step T."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output (only once the new one is complete)."),
    hash_: Optional[bool] = typer.Option(
        None,
        "--hash/--no-hash",
        help="--hash: full sha256 of inputs the trajectory has no hash for, in extrapolation.json (reads every input byte "
        "a second time). Default: a fingerprint (sizes, mtimes, safetensors headers, sampled blocks). --no-hash also "
        "skips hashing the output for --register.",
    ),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write a machine-readable summary here."),
) -> None:
    """Predict the checkpoint at step T: W = W_S0 + alpha (W_S1 - W_S0), a per-parameter least-squares line, or a rank-1 fit.

    --fit rank1 --base B --window A:C --target T [--rank r]: per tensor, M[t] = W_t - W_B over the window's checkpoints,
    its top singular pair (Gram matrix in float64), c_t = sigma u[t] fitted by a line in the step and evaluated at T;
    extrapolation.json records each tensor's explained variance and R² (a window of one checkpoint is two-point from B).

    Streams each tensor in chunks through a few reused buffers (peak memory tens of MB) into an atomically written, sharded HF
    checkpoint with extrapolation.json provenance; norm and non-floating tensors come from the latest input.
    """
    from rlvrx.extrapolate.options import WeightsOptions
    from rlvrx.extrapolate.request import extrapolate_weights
    from rlvrx.formulas import DEFAULT_COPY_PATTERNS
    from rlvrx.io.dtypes import parse_dtype

    options = WeightsOptions(
        copy_patterns=tuple(copy_pattern) if copy_pattern else DEFAULT_COPY_PATTERNS,
        extrapolate_all=extrapolate_all,
        precise=precise,
        dtype=parse_dtype(dtype) if dtype else None,
        max_shard_bytes=parse_size(max_shard_size),
        overwrite=overwrite,
        hash_inputs=bool(hash_),
        hash_registered=hash_ is not False,
    )
    bar = _progress_bar("extrapolating")
    with bar:
        task = bar.add_task("weights", total=None)

        def progress(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = extrapolate_weights(
            run,
            base=base,
            second=second,
            target=target,
            alpha=alpha,
            base_path=base_path,
            second_path=second_path,
            fit=fit,
            window=parse_window(window) if window is not None else None,
            rank=rank,
            out=out,
            register=register,
            options=options,
            progress=progress,
            warn=warn,
        )

    table = Table(show_header=False, title=f"extrapolated -> {result.out}", title_justify="left")
    table.add_column("", style="bold")
    table.add_column("")
    table.add_row("method", result.method)
    if result.target_step is not None:
        table.add_row("target step", str(result.target_step))
    if result.alpha is not None:
        table.add_row("alpha", f"{result.alpha:g}")
    for info, coef in zip(result.inputs, result.coefficients or [None] * len(result.inputs)):
        label = info["role"] if info["step"] is None else f"{info['role']} (step {info['step']})"
        table.add_row(label, info["path"] if coef is None else f"c={coef:+.4g}  {info['path']}")
    if result.method == "rank1":
        medians = result.medians()
        table.add_row("rank", str(result.rank))
        for key, label in (("median_explained_variance", "median explained var."), ("median_r2", "median R² of c_t")):
            table.add_row(label, "-" if medians[key] is None else f"{medians[key]:.4f}")
    table.add_row("tensors", f"{len(result.extrapolated)} extrapolated, {len(result.copied)} copied from the latest")
    table.add_row("arithmetic", f"{result.compute_dtype} -> {', '.join(result.output_dtypes)}")
    table.add_row("written", f"{_human(result.bytes_written)} in {result.seconds:.1f} s")
    if result.registered:
        table.add_row("registered", f"step {result.target_step}, kind extrapolated")
    console.print(table)
    write_json(json_path, result.summary())


def _percent(value, stderr=None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" + (f" ± {100 * stderr:.1f}" if stderr is not None else "")


@app.command()
def logits(
    run: Optional[Path] = typer.Argument(None, help="Run directory with trajectory.json (not needed with --base-path/--second-path)."),
    base: Optional[int] = typer.Option(None, "--base", help="Step S0 of the base (earlier) checkpoint."),
    second: Optional[int] = typer.Option(None, "--second", help="Step S1 of the second (later) checkpoint."),
    target: Optional[int] = typer.Option(None, "--target", help="Step T to predict; alpha = (T - S0) / (S1 - S0)."),
    alpha: Optional[float] = typer.Option(None, "--alpha", help="Explicit alpha instead of --target."),
    base_path: Optional[Path] = typer.Option(None, "--base-path", help="Base model directory or hub id org/name[@revision] (instead of a step of RUN)."),
    second_path: Optional[Path] = typer.Option(None, "--second-path", help="Second model directory or hub id org/name[@revision] (instead of a step of RUN)."),
    task: Optional[str] = typer.Option(None, "--task", "-t", help="Task: arithmetic, aime24, aime25, math500, gsm8k, or package.module:function."),
    data: Optional[Path] = typer.Option(None, "--data", help="A JSONL/parquet file of problems, as a math task (instead of --task)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Directory holding aime24.jsonl, math500.jsonl, ... ($RLVRX_DATA_DIR)."),
    task_option: List[str] = typer.Option([], "--task-option", help="KEY=VALUE task option (repeat), e.g. digits=3."),
    samples: Optional[int] = typer.Option(None, "-k", "--samples", "-n", help="Samples per problem (default: 64 on GPU as in the paper, 4 on CPU)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (default 0.6; 0 = greedy)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling threshold (default 0.95)."),
    max_new_tokens: Optional[int] = typer.Option(
        None, "--max-new-tokens", help="Longest completion (default: 32768 on GPU, 256 on CPU; arithmetic: 2 * digits + 2)."
    ),
    seed: int = typer.Option(0, "--seed", help="Sampling seed; the same seed gives the same samples."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N problems."),
    ids: Optional[str] = typer.Option(None, "--ids", help="Only these problem ids (comma-separated)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows (problem x sample) decoded at once (default 256)."),
    device: str = typer.Option("auto", "--device", help="Torch device (default: cuda when available, else cpu)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Model dtype (default: bfloat16 on GPU, float32 on CPU)."),
    k_list: Optional[str] = typer.Option(None, "--k-list", help="Report pass@k / maj@k for these k, e.g. 1,4,16."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Grading worker processes (default: min(4, CPUs))."),
    no_grade: bool = typer.Option(False, "--no-grade", help="Only write the generations file."),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        help="Output directory: OUT/<task>.jsonl and its provenance file (default: RUN/extrapolated/logits-s<S0>-s<S1>-t<T>, a<alpha> with --alpha).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write a machine-readable summary here."),
) -> None:
    """Sample from extrapolated logits l = l_S0 + alpha (l_S1 - l_S0): both models decode in lockstep.

    Writes a generations file that `rlvrx eval --generations FILE` grades, and prints pass@k / avg@k
    right away when the task has a verifier.
    """
    from rlvrx.extrapolate.logits import LogitsOptions, extrapolate_logits
    from rlvrx.render.tables import progress_bar
    from rlvrx.models import check_device

    if device != "auto":
        check_device(device, "--device")

    options = LogitsOptions(
        k=samples,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        limit=limit,
        ids=ids,
        grade=not no_grade,
        workers=workers,
        k_list=parse_k_list(k_list),
        overwrite=overwrite,
    )
    bar = progress_bar(console, transient=True)
    stages: dict[str, int] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in stages:
            stages[stage] = bar.add_task("sampling" if stage == "generate" else "grading", total=total)
        bar.update(stages[stage], completed=done, total=total)

    with bar:
        result = extrapolate_logits(
            run,
            task=task,
            base=base,
            second=second,
            target=target,
            alpha=alpha,
            base_path=base_path,
            second_path=second_path,
            out=out,
            data=data,
            data_dir=data_dir,
            task_options=task_options(task_option),
            options=options,
            progress=progress,
            note=warn,
        )

    s = result.sampling
    console.print(
        f"[green]wrote[/] {result.out}: {result.problems} problems x {s['n']} samples, alpha {result.alpha:g}, "
        f"temperature {s['temperature']:g}, top-p {s['top_p']:g}, max {s['max_new_tokens']} new tokens, seed {s['seed']} "
        f"({result.device}, {result.dtype}, {result.seconds_generate:.1f} s)",
        highlight=False,
    )
    if result.metrics is not None:
        m = result.metrics
        table = Table(title=f"{result.task}, extrapolated logits (%)", title_justify="left", header_style="bold")
        table.add_column("metric")
        table.add_column("value", justify="right")
        table.add_row("avg ± stderr", _percent(m.get("avg"), m.get("avg_stderr")))
        errors = m.get("stderr") or {}
        for key in sorted((k for k in m if k.startswith("pass@")), key=lambda k: int(k.split("@")[1])):
            table.add_row(f"{key} ± stderr", _percent(m[key], errors.get(key)))
        for key in sorted((k for k in m if k.startswith("maj@")), key=lambda k: int(k.split("@")[1])):
            if int(key.split("@")[1]) >= 2:
                table.add_row(f"{key} ± stderr", _percent(m[key], errors.get(key)))
        table.add_row("problems", str(m.get("problems")))
        console.print(table)
    write_json(json_path, result.summary())


@app.command()
def compare(
    run: Path = typer.Argument(..., help="Run directory with trajectory.json; --target must be one of its real checkpoints."),
    target: int = typer.Option(..., "--target", help="Step T to predict (a real checkpoint, held out: the window must end before it)."),
    window: Optional[str] = typer.Option(None, "--window", help="A:C, the checkpoints the predictors see (those before T; default: all before T)."),
    rank: int = typer.Option(1, "--rank", help="Components of the rank1 predictor.", min=1),
    task: Optional[str] = typer.Option(
        None, "--task", "-t", help="Also score every model's eval accuracy on this task (e.g. arithmetic); default: weight error only."
    ),
    task_option: List[str] = typer.Option([], "--task-option", help="KEY=VALUE task option (repeat), e.g. digits=2."),
    samples: Optional[int] = typer.Option(None, "-k", "--samples", help="Samples per problem for the eval (default: the eval's)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N problems of the eval."),
    device: str = typer.Option("auto", "--device", help="Torch device for the eval."),
    seed: int = typer.Option(0, "--seed", help="Eval sampling seed."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory of the predictions (default: RUN/extrapolated/compare-t<T>-w<A>-<C>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier shoot-out's predictions in --out."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the shoot-out's numbers here."),
) -> None:
    """Which predictor to trust on this run: predict a held-out real step with two-point (window ends), lstsq, rank1 (RELEX)
    and AlphaRL's rank-1 update, and compare each with the real checkpoint.

    Weight error: ||pred - real||_F / ||real - W_C||_F over the floating tensors (< 1: better than not moving from the window's
    end). With --task, eval accuracy of every prediction next to the real checkpoint's and the window end's.
    """
    from rlvrx.cli.shootout import ShootoutOptions, default_output, evaluate_all, predict_all
    from rlvrx.models import check_device
    from rlvrx.render.shootout import shootout_table

    if device != "auto":
        check_device(device, "--device")
    if samples is not None and samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1, got {limit}")
    bounds = parse_window(window) if window is not None else (0, target - 1)
    options = ShootoutOptions(
        rank=rank, task=task, task_options=task_options(task_option), samples=samples, limit=limit, device=device, seed=seed, overwrite=overwrite
    )
    with console.status("predicting with two-point, lstsq, rank1, alpharl"):
        result = predict_all(run, target, bounds, out or default_output(run, target, bounds), options)
    if task is not None:
        evaluate_all(result, options, note=lambda m: console.print(m, highlight=False))
    console.print(shootout_table(result))
    write_json(json_path, result)
