"""`rlvrx report RUN`: what a run directory holds, as terminal tables and one self-contained HTML page.

Reads what the commands left behind (metrics.jsonl, trajectory.json, stages/*.json, linearity/ and
compare.png); draws the training curves and a few parameters' trajectories with their fitted lines into
RUN/report/*.png; embeds every plot in the HTML as a data URI, so the page is one file.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from rlvrx.io.atomic import atomic_write_text
from rlvrx.errors import RlvrxError, UsageError
from rlvrx.io.jsonio import read_json
from rlvrx.render.plots import save_line_fits_png, save_training_png
from rlvrx.render.tables import fmt, table
from rlvrx.rundir import COMPARE_PNG, LINEARITY_KINDS, RunDir
from rlvrx.trajectory import Trajectory


def gather(run_dir: str | Path) -> dict:
    rd = RunDir(run_dir)
    run = rd.root
    if not run.is_dir():
        raise UsageError(f"{run}: no such run directory")
    metrics = rd.read_metrics()
    stages = {}
    for path in sorted(rd.stages.glob("*.json")):
        stages[path.stem] = read_json(path, dict)
    for model, tasks in (stages.get("eval") or {}).items():
        if not isinstance(tasks, dict) or not all(isinstance(t, dict) for t in tasks.values()):
            raise UsageError(f"{rd.stage_summary('eval')}: model {model!r} must map task names to objects of metrics")
    for kind in LINEARITY_KINDS:
        if f"linearity-{kind}" not in stages and rd.linearity_summary(kind).is_file():
            stages[f"linearity-{kind}"] = read_json(rd.linearity_summary(kind), dict)
    if rd.trajectory.is_file():
        Trajectory.load(run)  # a damaged manifest is a one-line error, not a silently missing plot
    if not metrics and not stages and not rd.trajectory.is_file():
        raise UsageError(f"{run}: nothing to report (no metrics.jsonl, stages/ or trajectory.json)")
    images = {}
    for kind in LINEARITY_KINDS:
        for png in sorted(rd.linearity(kind).glob("*.png")):
            images[f"linearity/{kind}/{png.name}"] = png
    rank_png = rd.linearity("rank") / "rank1_energy.png"
    if rank_png.is_file():
        images["linearity/rank/rank1_energy.png"] = rank_png
    if rd.compare_png.is_file():
        images[rd.compare_png.name] = rd.compare_png
    recipe = rd.recipe.read_text() if rd.recipe.is_file() else None
    return {"run": run, "metrics": metrics, "stages": stages, "images": images, "recipe": recipe}


# ----------------------------------------------------------------------------------------------
# Plots


def parameter_series(run: Path, n_params: int = 6, seed: int = 0) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]] | None:
    """(steps, [(label, values)]): a few parameters (those that moved most in two 2-D tensors) at each
    base/rl checkpoint; None when there are fewer than 3 checkpoints or no such tensor."""
    traj = Trajectory.load(run)
    entries = traj.select(("base", "rl"))
    if len(entries) < 3:
        return None
    try:
        ckpts = traj.checkpoints(entries)
    except RlvrxError:  # checkpoints deleted, damaged or of different shapes: the page goes on without this plot
        return None
    steps = np.array([s for s, _ in ckpts], dtype=np.float64)
    infos = ckpts[0][1].infos()
    names = [n for n, i in infos.items() if i.dtype.is_floating_point and len(i.shape) == 2 and "embed" not in n]
    if not names:
        return None
    rng = np.random.default_rng(seed)
    chosen = [names[i] for i in sorted(rng.choice(len(names), size=min(2, len(names)), replace=False))]
    series = []
    for name in chosen:
        rows = min(infos[name].shape[0], 64)
        stack = np.stack([c.get_rows(name, 0, rows).float().numpy().reshape(-1) for _, c in ckpts])  # [K, P]
        moved = stack.max(0) - stack.min(0)
        for p in np.argsort(-moved)[: n_params // len(chosen)]:
            series.append((f"{name.replace('model.', '')}[{p}]", stack[:, p]))
    return steps, series


def make_plots(data: dict) -> dict[str, Path]:
    report_dir = RunDir(data["run"]).report
    made = {"report/training.png": save_training_png(data["metrics"], report_dir / "training.png")}
    series = parameter_series(data["run"]) if RunDir(data["run"]).trajectory.is_file() else None
    if series is not None:
        made["report/trajectories.png"] = save_line_fits_png(report_dir / "trajectories.png", *series)
    return {**{k: v for k, v in made.items() if v is not None}, **data["images"]}


# ----------------------------------------------------------------------------------------------
# Tables (rows shared by the terminal and the HTML page)


def _cell(value) -> str:
    """A table cell: numbers through tables.fmt, text as it is."""
    if value is None or (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)):
        return fmt(value)
    return str(value)


def summary_tables(data: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """[(title, header, rows)] for every part of the run that is present."""
    tables = []
    stages = data["stages"]
    for key in ("train", "rl-extra"):
        s = stages.get(key)
        if isinstance(s, dict) and "RL-Extra" in s:  # rl-extra --baseline writes {label: summary}
            s = s["RL-Extra"]
        if isinstance(s, dict):
            rows = [
                [label, _cell(s.get(k))]
                for k, label in (
                    ("grad_steps", "gradient steps"),
                    ("steps", "effective steps"),
                    ("checkpoints", "checkpoints"),
                    ("test_accuracy_start", "greedy test accuracy, start"),
                    ("test_accuracy_end", "greedy test accuracy, end"),
                    ("reward_first", "reward, first step"),
                    ("reward_last", "reward, last 5 steps"),
                    ("train_time_s", "training time (s)"),
                )
            ]
            tables.append((f"training ({key})", ["", "value"], rows))
    for key, count in (("linearity-weights", "n_params"), ("linearity-logprobs", "n_tokens")):
        s = stages.get(key)
        if isinstance(s, dict):
            rows = [
                [label, _cell(s.get(k))]
                for k, label in (
                    ("median_r2", "median R²"),
                    ("mean_r2", "mean R²"),
                    ("frac_r2_gt_0_7", "fraction R² > 0.7"),
                    ("frac_r2_gt_0_9", "fraction R² > 0.9"),
                    (count, count.replace("n_", "counted ")),
                    ("n_filtered", "filtered out"),
                )
            ]
            if "direction_cosine" in s:
                rows.append(["direction cosine (successive deltas)", _cell(s.get("direction_cosine"))])
            if "holdout_rel_error" in s:
                rows.append(["held-out relative error (last checkpoint)", _cell(s.get("holdout_rel_error"))])
            steps = s.get("steps") if isinstance(s.get("steps"), list) else []
            rows.append(["checkpoints (steps)", f"{len(steps)} ({steps[0]}..{steps[-1]})" if steps else "-"])
            tables.append((key.replace("-", " "), ["", "value"], rows))
    rows = []
    for key in ("extrapolate-weights", "extrapolate-logits"):
        s = stages.get(key)
        if isinstance(s, dict):
            inputs = ", ".join(f"{i.get('role')} {i.get('step')}" for i in s.get("inputs") or [] if isinstance(i, dict))
            rows.append([key.split("-")[1], s.get("method", "-"), inputs, _cell(s.get("target_step")), _cell(s.get("alpha")), str(s.get("out", "-"))])
    if rows:
        tables.append(("extrapolation", ["kind", "method", "inputs", "target", "alpha", "output"], rows))
    tables.extend(_rank_tables(stages))
    ev = stages.get("eval")
    if isinstance(ev, dict) and ev:
        models = list(ev)
        tasks = sorted({t for m in models for t in ev[m] if t != "overall"})
        for task in tasks:
            metrics = sorted(
                {k for m in models for k in ev[m].get(task, {}) if k.startswith(("pass@", "maj@")) or k in ("avg", "n")},
                key=lambda k: (k[0] != "n", k[0] != "a", k.split("@")[0], int(k.split("@")[1]) if "@" in k else 0),
            )
            rows = [[metric if metric == "n" else f"{metric} ± stderr"] + [_with_stderr(ev[m].get(task, {}), metric) for m in models] for metric in metrics]
            tables.append((f"eval: {task} (± one standard error over problems)", ["metric"] + models, rows))
    return tables


def _with_stderr(metrics: dict, key: str) -> str:
    """'value ± standard error' of one eval metric (the value alone when it has none)."""
    value = _cell(metrics.get(key))
    error = (metrics.get("stderr") or {}).get(key) if isinstance(metrics.get("stderr"), dict) else None
    return value if error is None or key == "n" else f"{value} ± {_cell(error)}"


def _rank_tables(stages: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The rank-1 diagnostics (linearity-rank) and the predictor shoot-out (extrapolate-compare), when present."""
    tables = []
    s = stages.get("linearity-rank")
    if isinstance(s, dict):
        rows = [
            [label, _cell(s.get(k))]
            for k, label in (
                ("median_rank1_energy", "median rank-1 energy"),
                ("median_u_stability", "median u1 stability"),
                ("median_v_stability", "median v1 stability"),
                ("median_sigma1_r2", "median R² of sigma1 vs step"),
                ("n_tensors", "2-D weights"),
            )
        ]
        tables.append(("rank-1 structure of the updates", ["", "value"], rows))
    s = stages.get("extrapolate-compare")
    if isinstance(s, dict) and isinstance(s.get("predictors"), dict):
        acc = s.get("accuracy") if isinstance(s.get("accuracy"), dict) else {}
        rows = [[name, _cell(row.get("relative")), _cell((acc.get(name) or {}).get("avg"))] for name, row in s["predictors"].items() if isinstance(row, dict)]
        if acc:
            rows += [[name, "-", _cell((acc.get(name) or {}).get("avg"))] for name in ("window-end", "real")]
        steps = s.get("window_steps") or []
        title = f"predictor shoot-out: step {s.get('target')} from {steps[0]}..{steps[-1]}" if steps else "predictor shoot-out"
        tables.append((title, ["predictor", "weight error / drift", "accuracy"], rows))
    return tables


def print_summary(data: dict, console) -> None:
    for title, header, rows in summary_tables(data):
        console.print(table(title, header, rows))


# ----------------------------------------------------------------------------------------------
# HTML


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'


def render_html(data: dict, plots: dict[str, Path]) -> str:
    run = data["run"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>rlvrx report: {html.escape(run.name)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:14px}"
        "th{background:#f3f3f3}img{max-width:100%;margin:0.5em 0}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:12px}"
        "h2{border-bottom:1px solid #ddd;padding-bottom:0.2em}</style></head><body>",
        f"<h1>rlvrx report: {html.escape(str(run))}</h1>",
    ]
    sections = [
        ("Training", ["report/training.png"]),
        ("Weight linearity", ["linearity/weights/r2_hist.png", "linearity/weights/r2_heatmap.png", "report/trajectories.png"]),
        ("Log-prob linearity", [k for k in plots if k.startswith("linearity/logprobs/")]),
        ("RL-Extra vs baseline", [COMPARE_PNG]),
    ]
    tables = summary_tables(data)
    for title, keys in sections:
        present = [k for k in keys if k in plots]
        section_tables = [
            t
            for t in tables
            if t[0].lower().startswith(title.split()[0].lower())
            or (title == "Weight linearity" and t[0] == "linearity weights")
            or (title == "Log-prob linearity" and t[0] == "linearity logprobs")
        ]
        if not present and not section_tables:
            continue
        parts.append(f"<h2>{html.escape(title)}</h2>")
        for t in section_tables:
            parts.append(_html_table(*t))
        parts += [_img(plots[k]) for k in present]
    predictors = [t for t in tables if t[0].startswith(("rank-1", "predictor"))]
    if predictors or "linearity/rank/rank1_energy.png" in plots:
        parts.append("<h2>Rank-1 structure and predictors</h2>")
        parts += [_html_table(*t) for t in predictors]
        parts += [_img(plots[k]) for k in ("linearity/rank/rank1_energy.png",) if k in plots]
    rest = [t for t in tables if t[0].startswith(("extrapolation", "eval"))]
    if rest:
        parts.append("<h2>Extrapolation and evaluation</h2>")
        parts += [_html_table(*t) for t in rest]
    if data["recipe"]:
        parts.append("<h2>Resolved recipe</h2><pre>" + html.escape(data["recipe"]) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<h3>{html.escape(title)}</h3><table><tr>{head}</tr>{body}</table>"


def write_report(run_dir: str | Path, html_path: str | Path | None = None) -> tuple[dict, Path]:
    """Gather, plot and write the HTML page (default RUN/report/index.html); return (data, html path)."""
    data = gather(run_dir)
    plots = make_plots(data)
    out = Path(html_path) if html_path else RunDir(data["run"]).report / "index.html"
    atomic_write_text(out, render_html(data, plots))
    return data, out
