"""`rlvrx linearity weights|logprobs|merge|rank`: how linearly weights and log-probs move with the step; the rank-1 structure of the updates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from rlvrx.cli.args import parse_shard, parse_window
from rlvrx.cli.common import console, task_options, warn, write_json
from rlvrx.errors import UsageError

app = typer.Typer(no_args_is_help=True)

RUN_ARG = typer.Argument(None, help="Run directory holding trajectory.json (or pass --checkpoint instead).", show_default=False)
CHECKPOINT_OPT = typer.Option(
    [], "--checkpoint", "-c", help="STEP=PATH of one checkpoint (PATH may be a hub id org/name[@revision]); repeat, in increasing step order (instead of RUN)."
)
WINDOW_OPT = typer.Option(None, "--window", help="Only steps in A:B (inclusive; either end may be left out).")
EXTRAPOLATED_OPT = typer.Option(False, "--include-extrapolated", help="Also use the run's extrapolated checkpoints (default: base + rl).")
WEIGHTS_OUT_OPT = typer.Option(None, "--out", help="Output directory (default: RUN/linearity/weights; ./linearity/weights without RUN).")
LOGPROBS_OUT_OPT = typer.Option(None, "--out", help="Output directory (default: RUN/linearity/logprobs; ./linearity/logprobs without RUN).")
JSON_OPT = typer.Option(None, "--json", help="Write the machine-readable summary here.")
NO_PLOTS_OPT = typer.Option(False, "--no-plots", help="Skip the PNG plots.")


def resolve_checkpoints(run: Path | None, pairs: list[str], window: str | None, include_extrapolated: bool):
    """[(step, Checkpoint)] from a run directory or STEP=PATH pairs, after the window; same structure checked."""
    from rlvrx.linearity.stats import check_steps
    from rlvrx.trajectory import Trajectory, parse_step_paths

    bounds = parse_window(window)
    if run is not None and pairs:
        raise UsageError("pass either a RUN directory or --checkpoint STEP=PATH pairs, not both")
    if run is None and not pairs:
        raise UsageError("pass a RUN directory or at least three --checkpoint STEP=PATH pairs")
    if pairs:
        raw_steps = [p.partition("=")[0].strip() for p in pairs]
        traj = parse_step_paths(pairs)
        order = [int(s) for s in raw_steps if s.lstrip("-").isdigit()]
        if order != sorted(order):
            raise UsageError(f"--checkpoint steps are not in increasing order ({order}); list them sorted by step")
        entries = traj.select(("rl",), bounds)
    else:
        traj = Trajectory.load(run)
        kinds = ("base", "rl", "extrapolated") if include_extrapolated else ("base", "rl")
        entries = traj.select(kinds, bounds)
    what = "checkpoints" + (f" in window {window}" if window else "")
    check_steps([e.step for e in entries], what)
    return traj.checkpoints(entries)


def _default_out(run: Path | None, name: str) -> Path:
    from rlvrx.rundir import RunDir

    return RunDir(run).linearity(name) if run is not None else Path("linearity") / name


def _print_summary(tables: list, line: str, histogram: list | None, empty: str, written: list[Path]) -> None:
    """The tables, the global line, the text histogram (or the `empty` warning when histogram is None), the files."""
    from rlvrx.render.tables import text_histogram

    for tbl in tables:
        console.print(tbl)
    console.print(line, highlight=False)
    if histogram is not None:
        console.print(text_histogram(histogram, bins=20), highlight=False)
    else:
        warn(empty)
    for path in written:
        console.print(f"[green]wrote[/] {path}", highlight=False)


def _print_weights(summary: dict, written: list[Path]) -> None:
    from rlvrx.render.linearity import weight_global_line, weight_tables

    _print_summary(
        weight_tables(summary),
        weight_global_line(summary),
        summary["histogram"] if summary["n_params"] else None,
        "every parameter was filtered out; no R² statistics (lower --min-abs-change / --min-unique?)",
        written,
    )


def _check_weight_flags(min_abs_change: float, min_unique: int, sample: float | None, min_per_tensor: int, memory_mb: int) -> None:
    if not min_abs_change >= 0:
        raise UsageError(f"--min-abs-change must be >= 0, got {min_abs_change}")
    if min_unique < 1:
        raise UsageError(f"--min-unique must be >= 1, got {min_unique}")
    if sample is not None and not 0 < sample <= 1:
        raise UsageError(f"--sample must be a fraction in (0, 1], got {sample}")
    if min_per_tensor < 1:
        raise UsageError(f"--min-per-tensor must be >= 1, got {min_per_tensor}")
    if memory_mb < 1:
        raise UsageError(f"--memory-mb must be >= 1, got {memory_mb}")


@app.command()
def weights(
    run: Optional[Path] = RUN_ARG,
    checkpoint: List[str] = CHECKPOINT_OPT,
    window: Optional[str] = WINDOW_OPT,
    include_extrapolated: bool = EXTRAPOLATED_OPT,
    sample: Optional[float] = typer.Option(
        None,
        "--sample",
        help="Fraction of parameters per tensor (the paper: 0.001); default every parameter. Reads only the sampled "
        "parameters; every statistic, direction cosine and held-out error included, is then computed on the sample. "
        "Medians: without --sample they come from a histogram of R² (within 1e-5; layer x module cells within 1e-3), "
        "with --sample they are exact.",
    ),
    min_per_tensor: int = typer.Option(50, "--min-per-tensor", help="With --sample: at least this many parameters per tensor."),
    seed: int = typer.Option(0, "--seed", help="Seed of the per-tensor samples."),
    min_abs_change: float = typer.Option(1e-4, "--min-abs-change", help="Drop parameters whose max - min over the steps is below this."),
    min_unique: int = typer.Option(4, "--min-unique", help="Drop parameters with fewer distinct values over the steps."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: analyse only part I (0-based) of N tensor parts and write a part file for `merge`."),
    memory_mb: int = typer.Option(512, "--memory-mb", help="Cap on the working memory of one block of parameters read from all checkpoints (per thread)."),
    read_dtype: Optional[str] = typer.Option(
        None,
        "--read-dtype",
        help="bfloat16: round every value to bf16 on read, as the official RLVR-Linearity code loads checkpoints "
        "(changes fp32 results: fewer distinct values, more parameters filtered); default: the stored dtype, exact.",
    ),
    tensors: List[str] = typer.Option(
        [], "--tensors", help="GLOB of tensor names to analyse (repeat; fnmatch, e.g. 'model.layers.*.mlp.*'); default every float tensor."
    ),
    dump_params: List[str] = typer.Option(
        [],
        "--dump-params",
        help="GLOB (repeat): also write OUT/params.npz with every parameter of the matching tensors: its values over "
        "the steps (NAME/values, as read), R² (NAME/r2, NaN when filtered) and filter code (NAME/filter), and 'steps'.",
    ),
    out: Optional[Path] = WEIGHTS_OUT_OPT,
    json_path: Optional[Path] = JSON_OPT,
    no_plots: bool = NO_PLOTS_OPT,
) -> None:
    """Per-parameter R² of weight against step, streamed over every tensor of every checkpoint."""
    from rlvrx.linearity.dump import dump_parameters
    from rlvrx.linearity.kernel import READ_DTYPES
    from rlvrx.linearity.plan import MAX_CHECKPOINTS, matching_tensors, selected_tensors
    from rlvrx.linearity.summary import public_json, summarize
    from rlvrx.linearity.weights import WeightSettings, analyze_weights
    from rlvrx.render.linearity import write_weight_outputs
    from rlvrx.render.tables import progress_bar

    _check_weight_flags(min_abs_change, min_unique, sample, min_per_tensor, memory_mb)
    if read_dtype is not None and read_dtype not in READ_DTYPES:
        raise UsageError(f"--read-dtype must be {' or '.join(READ_DTYPES)} (or left out for the stored dtype), got {read_dtype!r}")
    if any(not p for p in tensors + dump_params):
        raise UsageError("--tensors and --dump-params take a non-empty GLOB")
    if dump_params and shard:
        raise UsageError("--dump-params writes one file; run it without --shard")
    settings = WeightSettings(
        min_abs_change=min_abs_change,
        min_unique=min_unique,
        sample=sample,
        min_per_tensor=min_per_tensor,
        seed=seed,
        memory_mb=memory_mb,
        read_dtype=read_dtype,
        tensors=tuple(tensors),
    )
    part = parse_shard(shard) if shard else None
    checkpoints = resolve_checkpoints(run, checkpoint, window, include_extrapolated)
    if len(checkpoints) > MAX_CHECKPOINTS:
        raise UsageError(f"weight linearity takes at most {MAX_CHECKPOINTS} checkpoints, got {len(checkpoints)}; use --window or every n-th step")
    out = out or _default_out(run, "weights")
    todo = selected_tensors(checkpoints, part, settings.tensors)
    if dump_params:
        matching_tensors(checkpoints[0][1].infos(), dump_params, "--dump-params")  # a bad GLOB fails before the long run
    position = {name: i for i, (name, _) in enumerate(todo)}
    with progress_bar(console, count=False) as bar:
        progress_task = bar.add_task("weights", total=sum(n for _, n in todo) or 1)

        def advance(name: str, n: int) -> None:
            bar.update(progress_task, advance=n, description=f"[{position[name] + 1}/{len(todo)}] {name}")

        state = analyze_weights(checkpoints, settings, part, advance)
    if part is not None:
        path = json_path or out / f"part-{part[0]}-of-{part[1]}.json"
        write_json(path, state.to_json())
        summary = summarize(state)
        console.print(
            f"part {part[0]}/{part[1]}: {len(state.tensors)} of {state.structure['n_tensors']} tensors, {summary['n_params']:,} parameters with R²",
            highlight=False,
        )
        console.print(f"[green]wrote[/] {path}; combine all parts with `rlvrx linearity merge PARTS... --json OUT`", highlight=False)
        return
    summary = summarize(state)
    written = write_weight_outputs(summary, out, plots=not no_plots)
    if dump_params:
        names = matching_tensors(checkpoints[0][1].infos(), dump_params, "--dump-params")
        with progress_bar(console, count=False) as bar:
            dump_task = bar.add_task("dumping", total=sum(checkpoints[0][1].infos()[n].numel for n in names) or 1)
            dump_parameters(checkpoints, dump_params, out / "params.npz", settings, lambda name, n: bar.update(dump_task, advance=n, description=name))
        written.append(out / "params.npz")
    if json_path is not None:
        write_json(json_path, public_json(summary))
        written.append(json_path)
    _print_weights(summary, written)


@app.command()
def merge(
    parts: List[Path] = typer.Argument(..., help="Part files written by `rlvrx linearity weights --shard I/N`.", show_default=False),
    json_path: Path = typer.Option(..., "--json", help="Write the combined summary here (same keys as `weights --json`)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory for the table files and plots (default: the first part's directory)."),
    no_plots: bool = NO_PLOTS_OPT,
) -> None:
    """Combine the parts of a sharded `linearity weights` run into the result of one run."""
    from rlvrx.linearity.state import WeightState, merge_states
    from rlvrx.linearity.summary import public_json, summarize
    from rlvrx.render.linearity import write_weight_outputs

    states = []
    for path in parts:
        if not path.is_file():
            raise UsageError(f"{path}: no such part file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not valid JSON ({exc.msg})") from None
        states.append(WeightState.from_json(data, str(path)))
    summary = summarize(merge_states(states, [str(p) for p in parts]))
    written = write_weight_outputs(summary, out or parts[0].parent, plots=not no_plots)
    write_json(json_path, public_json(summary))
    _print_weights(summary, written + [json_path])


@app.command()
def logprobs(
    run: Optional[Path] = RUN_ARG,
    checkpoint: List[str] = CHECKPOINT_OPT,
    window: Optional[str] = WINDOW_OPT,
    include_extrapolated: bool = EXTRAPOLATED_OPT,
    probes: Optional[Path] = typer.Option(None, "--probes", help="JSONL of {prompt, response} or {prompt, responses: [...]} (with --generate: prompts only)."),
    generate: Optional[int] = typer.Option(None, "--generate", help="Sample this many probe responses from the first checkpoint."),
    task: Optional[str] = typer.Option(None, "--task", help="With --generate: take prompts from this task (e.g. arithmetic, math500) instead of --probes."),
    task_option: List[str] = typer.Option([], "--task-option", help="KEY=VALUE option of --task (repeat), e.g. data_dir=../shared/data/benchmarks."),
    split: str = typer.Option("test", "--split", help="With --task: which split's prompts."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="With --generate: response length limit."),
    temperature: float = typer.Option(1.0, "--temperature", help="With --generate: sampling temperature."),
    top_p: float = typer.Option(1.0, "--top-p", help="With --generate: nucleus sampling threshold."),
    seed: int = typer.Option(0, "--seed", help="With --generate: sampling seed."),
    min_logprob_change: float = typer.Option(0.2, "--min-logprob-change", help="Token filter threshold: see --filter."),
    token_filter: str = typer.Option(
        "endpoints",
        "--filter",
        help="Which tokens count: 'endpoints' keeps a token when |log-prob at the last step - at the first| > "
        "--min-logprob-change (the official RLVR-Linearity script); 'range' keeps it when max - min over all steps >= it.",
    ),
    score_eos: bool = typer.Option(
        False,
        "--score-eos/--no-score-eos",
        help="With --generate: also score the end-of-sequence token that ended a response (the official scripts do not).",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Probes scored per forward pass."),
    device: str = typer.Option("cpu", "--device", help="Torch device for the forward passes."),
    out: Optional[Path] = LOGPROBS_OUT_OPT,
    json_path: Optional[Path] = JSON_OPT,
    no_plots: bool = NO_PLOTS_OPT,
) -> None:
    """Per-token R² of teacher-forced log-probs against step, one checkpoint loaded at a time."""
    from rlvrx.generation import SamplingParams
    from rlvrx.io.atomic import atomic_write_text
    from rlvrx.linearity import logprobs as ll
    from rlvrx.models import check_device, context_length, load_tokenizer
    from rlvrx.render.linearity import logprob_global_line, logprob_tables, write_logprob_outputs
    from rlvrx.render.tables import progress_bar

    if task is not None and generate is None:
        raise UsageError("--task gives prompts only; add --generate N to sample probe responses for them")
    if task is not None and probes is not None:
        raise UsageError("pass either --probes FILE or --task NAME as the source of prompts, not both")
    if probes is None and task is None:
        raise UsageError("pass --probes FILE (JSONL with prompt and response(s)), or --generate N with --task NAME or --probes FILE of prompts")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    if generate is not None and generate < 1:
        raise UsageError(f"--generate must be >= 1, got {generate}")
    if not min_logprob_change >= 0:
        raise UsageError(f"--min-logprob-change must be >= 0, got {min_logprob_change}")
    if token_filter not in ll.FILTERS:
        raise UsageError(f"--filter must be one of {', '.join(ll.FILTERS)}, got {token_filter!r}")
    if score_eos and generate is None:
        raise UsageError("--score-eos applies to sampled probes; add --generate N (given probes are scored as written)")
    check_device(device, "--device")
    checkpoints = resolve_checkpoints(run, checkpoint, window, include_extrapolated)
    paths = [(step, ckpt.path) for step, ckpt in checkpoints]
    out = out or _default_out(run, "logprobs")
    first = paths[0][1]
    if generate is not None:
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
        with console.status(f"sampling {generate} probe responses from step {paths[0][0]}"):
            if task is not None:
                prompts = ll.task_prompts(task, load_tokenizer(first), split, task_options(task_option))
            else:
                prompts = ll.load_prompts(probes)
            items = ll.generate_probes(first, prompts, generate, params, batch_size, device, score_eos)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "probes.jsonl", "".join(json.dumps(p.to_json()) + "\n" for p in items))
    else:
        items = ll.load_probes(probes)
        needs_tokenizer = any(p.prompt_ids is None or p.response_ids is None for p in items)
        ll.tokenize_probes(items, load_tokenizer(first) if needs_tokenizer else None)
    ll.check_probes(items, context_length(first))
    with progress_bar(console) as bar:
        progress_task = bar.add_task("scoring", total=len(items) * len(paths))

        def advance(step: int, n: int) -> None:
            bar.update(progress_task, advance=n, description=f"scoring step {step}")

        lp, lg = ll.score_checkpoints(paths, items, batch_size, device, advance)
    summary = ll.analyze_logprobs([s for s, _ in paths], items, lp, lg, min_logprob_change, token_filter, score_eos if generate is not None else None)
    written = write_logprob_outputs(summary, out, plots=not no_plots)
    if json_path is not None:
        write_json(json_path, ll.public_json(summary))
        written.append(json_path)
    _print_summary(
        logprob_tables(summary),
        logprob_global_line(summary),
        summary["histogram"] if summary["n_tokens"] else None,
        f"every token was filtered out (log-prob change within {min_logprob_change:g}); lower --min-logprob-change?",
        written,
    )


@app.command()
def rank(
    run: Optional[Path] = RUN_ARG,
    checkpoint: List[str] = CHECKPOINT_OPT,
    window: Optional[str] = WINDOW_OPT,
    include_extrapolated: bool = EXTRAPOLATED_OPT,
    write_rank1: Optional[int] = typer.Option(
        None,
        "--write-rank1",
        help="STEP: instead of the diagnostics, write AlphaRL's rank-1 model of STEP to --out: W_base + ||Delta||_F u1 v1^T for "
        "every 2-D weight (base = the first checkpoint of the window), every other tensor as at STEP; `rlvrx eval` scores it.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="With --write-rank1: replace an existing --out (once the new one is complete)."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Output directory (default: RUN/linearity/rank); with --write-rank1 the checkpoint directory (required)."
    ),
    json_path: Optional[Path] = JSON_OPT,
    no_plots: bool = NO_PLOTS_OPT,
) -> None:
    """Rank-1 structure of the updates W_t - W_base of every 2-D weight (the first checkpoint of the window is the base).

    For each checkpoint after the base: the top singular triplet (subspace iteration), the rank-1 energy
    sigma1² / ||Delta||_F², the |cos| of u1 and v1 against the last checkpoint's, and the R² of sigma1 against step;
    medians by module type and by layer, a plot, summary.json and tensors.csv. One tensor's Delta in memory at a time.
    """
    from rlvrx.linearity.rank import analyze_rank, public_json, write_rank1 as write_rank1_model
    from rlvrx.render.linearity import rank_global_line, rank_tables, write_rank_outputs
    from rlvrx.render.tables import progress_bar

    checkpoints = resolve_checkpoints(run, checkpoint, window, include_extrapolated)
    if write_rank1 is not None:
        if out is None:
            raise UsageError("--write-rank1 STEP needs --out DIR, the checkpoint directory to write")
        steps = [s for s, _ in checkpoints]
        if write_rank1 not in steps[1:]:
            raise UsageError(f"--write-rank1 {write_rank1}: not a checkpoint after the base step {steps[0]} (steps: {steps})")
        with progress_bar(console) as bar:
            task = bar.add_task(f"rank-1 model of step {write_rank1}", total=None)
            path = write_rank1_model(
                checkpoints[0][1],
                dict(checkpoints)[write_rank1],
                out,
                overwrite=overwrite,
                progress=lambda name, done, total: bar.update(task, completed=done, total=total),
            )
        console.print(f"[green]wrote[/] {path}: rank-1 model of step {write_rank1} against base step {steps[0]}", highlight=False)
        return
    if overwrite:
        raise UsageError("--overwrite is for --write-rank1")
    out = out or _default_out(run, "rank")
    with progress_bar(console) as bar:
        task = bar.add_task("rank-1", total=None)
        summary = analyze_rank(checkpoints, lambda name, done, total: bar.update(task, completed=done, total=total, description=name))
    if not summary["n_tensors"]:
        raise UsageError("the checkpoints hold no 2-D floating weights; nothing to decompose")
    written = write_rank_outputs(summary, out, plots=not no_plots)
    if json_path is not None:
        write_json(json_path, public_json(summary))
        written.append(json_path)
    for tbl in rank_tables(summary):
        console.print(tbl)
    console.print(rank_global_line(summary), highlight=False)
    for path in written:
        console.print(f"[green]wrote[/] {path}", highlight=False)
