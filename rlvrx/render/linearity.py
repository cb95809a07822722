"""Presentation of linearity results: rich tables, the one-line summary, summary.json, CSV files and PNG plots.

The analyses (rlvrx.linearity) return plain dicts; this module turns them into what a person reads.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlvrx.io.atomic import atomic_write_text
from rlvrx.linearity.naming import layer_of, module_of
from rlvrx.render.tables import fmt, pct, table, write_csv
from rlvrx.render.plots import save_heatmap_png, save_histogram_png, save_lines_png

# ----------------------------------------------------------------------------------------------
# Weight linearity


def _weight_row(label: str, group: dict) -> list:
    return [
        label,
        group["n"],
        group["n_filtered"],
        fmt(group["mean_r2"]),
        fmt(group["median_r2"]),
        pct(group["frac_r2_gt_0_7"]),
        fmt(group["direction_cosine"]),
        fmt(group["holdout_rel_error"]),
    ]


WEIGHT_COLUMNS = ("params", "filtered", "mean", "median", "> 0.7", "cos Δ", "holdout")


def weight_tables(summary: dict) -> list:
    """Rich tables: by module type (with the global line) and by layer."""
    overall = {
        "n": summary["n_params"],
        "n_filtered": summary["n_filtered"],
        "mean_r2": summary["mean_r2"],
        "median_r2": summary["median_r2"],
        "frac_r2_gt_0_7": summary["frac_r2_gt_0_7"],
        "direction_cosine": summary["direction_cosine"],
        "holdout_rel_error": summary["holdout_rel_error"],
    }
    steps = summary["steps"]
    modules = [_weight_row(g["module"], g) for g in summary["by_module"]] + [_weight_row("all", overall)]
    layers = [_weight_row("-" if g["layer"] is None else str(g["layer"]), g) for g in summary["by_layer"]]
    return [
        table(f"weight R² by module type ({len(steps)} checkpoints, steps {steps[0]}..{steps[-1]})", ("module", *WEIGHT_COLUMNS), modules),
        table("weight R² by layer (- = outside the layers)", ("layer", *WEIGHT_COLUMNS), layers),
    ]


def weight_global_line(summary: dict) -> str:
    f = summary["filters"]
    s = summary["settings"]
    mode = "every parameter" if s.get("sample") is None else f"sample {s['sample']} per tensor (min {s['min_per_tensor']}, seed {s['seed']})"
    return (
        f"median R² {fmt(summary['median_r2'])}, mean {fmt(summary['mean_r2'])}, "
        f"R² > 0.7: {pct(summary['frac_r2_gt_0_7'])}, R² > 0.9: {pct(summary['frac_r2_gt_0_9'])} "
        f"over {fmt(summary['n_params'])} parameters ({mode}); filtered {fmt(summary['n_filtered'])}: "
        f"constant {fmt(f['constant'])}, max-min < {s['min_abs_change']:g} {fmt(f['min_abs_change'])}, "
        f"< {s['min_unique']} distinct values {fmt(f['min_unique'])}; "
        f"direction cosine {fmt(summary['direction_cosine'])}; the line through the earlier steps misses step "
        f"{summary['steps'][-1]} by {fmt(summary['holdout_rel_error'])}x the last step's change "
        f"({pct(summary['holdout_rel_error_total'])} of the whole change)"
    )


def weight_heatmap_matrix(summary: dict) -> tuple[np.ndarray, list[str], list[str]]:
    """Median R² per (layer, module) cell; rows = layers (then '-' for tensors outside layers)."""
    modules = [g["module"] for g in summary["by_module"]]
    layers = [g["layer"] for g in summary["by_layer"]]
    matrix = np.full((len(layers), len(modules)), np.nan)
    for cell in summary["cells"]:
        if cell["median_r2"] is not None:
            matrix[layers.index(cell["layer"]), modules.index(cell["module"])] = cell["median_r2"]
    return matrix, ["-" if l is None else str(l) for l in layers], modules


WEIGHT_CSV_HEADER = (
    "name",
    "module",
    "layer",
    "n",
    "n_filtered",
    "mean_r2",
    "median_r2",
    "frac_r2_gt_0_7",
    "direction_cosine",
    "holdout_rel_error",
)


def write_weight_outputs(summary: dict, out_dir, plots: bool = True) -> list:
    """summary.json, tensors.csv and (with plots) r2_hist.png, r2_heatmap.png under out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    path = out_dir / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=1) + "\n")
    written.append(path)
    rows = [
        [
            t["name"],
            module_of(t["name"]),
            layer_of(t["name"]),
            t["n"],
            t["n_filtered"],
            t["mean_r2"],
            t["median_r2"],
            t["frac_r2_gt_0_7"],
            t["direction_cosine"],
            t["holdout_rel_error"],
        ]
        for t in summary["tensors"]
    ]
    written.append(write_csv(out_dir / "tensors.csv", WEIGHT_CSV_HEADER, rows))
    if plots:
        steps = summary["steps"]
        written.append(
            save_histogram_png(
                out_dir / "r2_hist.png",
                summary["histogram"],
                title=f"weight R² vs step ({len(steps)} checkpoints, {summary['n_params']:,} params)",
                median=summary["median_r2"],
            )
        )
        matrix, row_labels, col_labels = weight_heatmap_matrix(summary)
        if matrix.size:
            written.append(
                save_heatmap_png(
                    out_dir / "r2_heatmap.png",
                    matrix,
                    row_labels,
                    col_labels,
                    title="median weight R² by layer and module",
                    colorbar_label="median R²",
                    xlabel="module",
                    ylabel="layer",
                )
            )
    return written


# ----------------------------------------------------------------------------------------------
# Log-prob linearity


def logprob_tables(summary: dict) -> list:
    def row(label, n, filtered, s):
        return [label, n, filtered, fmt(s["mean_r2"]), fmt(s["median_r2"]), pct(s["frac_r2_gt_0_7"]), pct(s["frac_r2_gt_0_9"])]

    tokens = {k: summary[k] for k in ("mean_r2", "median_r2", "frac_r2_gt_0_7", "frac_r2_gt_0_9")}
    steps = summary["steps"]
    rows = [
        row("token log-prob", summary["n_tokens"], summary["n_filtered"], tokens),
        row("chosen-token logit", summary["logit"]["n"], "-", summary["logit"]),
        row("response mean log-prob", summary["response_mean_logprob"]["n"], "-", summary["response_mean_logprob"]),
    ]
    title = f"log-prob R² vs step ({summary['n_probes']} probes, {len(steps)} checkpoints, steps {steps[0]}..{steps[-1]})"
    return [table(title, ("series", "n", "filtered", "mean", "median", "> 0.7", "> 0.9"), rows)]


def logprob_global_line(summary: dict) -> str:
    f = summary["filters"]
    return (
        f"median R² {fmt(summary['median_r2'])}, mean {fmt(summary['mean_r2'])}, R² > 0.7: {pct(summary['frac_r2_gt_0_7'])}, "
        f"R² > 0.9: {pct(summary['frac_r2_gt_0_9'])} over {fmt(summary['n_tokens'])} of {fmt(summary['n_tokens_scored'])} "
        f"response tokens; filtered {fmt(summary['n_filtered'])}: constant {fmt(f['constant'])}, "
        f"{_change_rule(summary)} {fmt(f['min_logprob_change'])}"
    )


def _change_rule(summary: dict) -> str:
    """The dropped tokens' rule: the official |last - first| <= x (endpoints) or max - min < x (range)."""
    x = f"{summary['min_logprob_change']:g}"
    return f"|last - first| <= {x}" if summary.get("filter", "endpoints") == "endpoints" else f"max - min < {x}"


def write_logprob_outputs(summary: dict, out_dir, plots: bool = True, max_lines: int = 10) -> list:
    """summary.json, tokens.csv, responses.csv and (with plots) r2_hist.png, response_logprob.png."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    compact = {k: v for k, v in summary.items() if k not in ("token_rows",)}
    path = out_dir / "summary.json"
    atomic_write_text(path, json.dumps(compact, indent=1) + "\n")
    written.append(path)
    header = ("probe", "position", "token_id", "logprob_first", "logprob_last", "change", "r2", "logit_r2", "filtered")
    written.append(write_csv(out_dir / "tokens.csv", header, ([r[h] for h in header] for r in summary["token_rows"])))
    steps = summary["steps"]
    header = ("probe", "n_tokens", "r2", *[f"mean_logprob@{s}" for s in steps])
    written.append(write_csv(out_dir / "responses.csv", header, ([r["probe"], r["n_tokens"], r["r2"], *r["mean_logprob"]] for r in summary["response_rows"])))
    if plots:
        written.append(
            save_histogram_png(
                out_dir / "r2_hist.png",
                summary["histogram"],
                title=f"token log-prob R² vs step ({summary['n_tokens']:,} tokens)",
                median=summary["median_r2"],
            )
        )
        series = {r["probe"]: r["mean_logprob"] for r in summary["response_rows"][:max_lines]}
        written.append(
            save_lines_png(
                out_dir / "response_logprob.png",
                steps,
                series,
                title="mean log-prob of each probe response",
                xlabel="step",
                ylabel="mean token log-prob",
            )
        )
    return written


# ----------------------------------------------------------------------------------------------
# Rank-1 diagnostics (rlvrx.linearity.rank)

RANK_COLUMNS = ("tensors", "rank-1 energy", "u stability", "v stability", "R² σ1")


def _rank_row(label: str, group: dict) -> list:
    return [
        label,
        group["n_tensors"],
        fmt(group["median_rank1_energy"]),
        fmt(group["median_u_stability"]),
        fmt(group["median_v_stability"]),
        fmt(group["median_sigma1_r2"]),
    ]


def rank_tables(summary: dict) -> list:
    """Rich tables of the medians over 2-D weights: by module type (with the global line) and by layer."""
    steps = summary["steps"]
    span = f"base {summary['base_step']}, steps {steps[0]}..{steps[-1]}"
    modules = [_rank_row(g["module"], g) for g in summary["by_module"]] + [_rank_row("all", summary)]
    layers = [_rank_row("-" if g["layer"] is None else str(g["layer"]), g) for g in summary["by_layer"]]
    return [
        table(f"rank-1 structure of W_t - W_base by module type (medians; {span})", ("module", *RANK_COLUMNS), modules),
        table("rank-1 structure by layer (- = outside the layers)", ("layer", *RANK_COLUMNS), layers),
    ]


def rank_global_line(summary: dict) -> str:
    return (
        f"over {summary['n_tensors']} 2-D weights: median rank-1 energy {fmt(summary['median_rank1_energy'])} "
        f"(sigma1² / ||Delta||_F² at step {summary['steps'][-1]}), top singular vectors' |cos| against the last step's: "
        f"u {fmt(summary['median_u_stability'])}, v {fmt(summary['median_v_stability'])}; R² of sigma1 vs step "
        f"{fmt(summary['median_sigma1_r2'])}"
    )


RANK_CSV_HEADER = ("name", "module", "layer", "rank1_energy", "u_stability", "v_stability", "sigma1_r2", "sigma1_last", "frobenius_last")


def write_rank_outputs(summary: dict, out_dir, plots: bool = True) -> list:
    """summary.json, tensors.csv and (with plots) rank1_energy.png (median energy per module vs step)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=1) + "\n")
    written = [path]
    rows = [
        [t["name"], t["module"], t["layer"], t["rank1_energy"], t["u_stability"], t["v_stability"], t["sigma1_r2"], t["sigma1"][-1], t["frobenius"][-1]]
        for t in summary["tensors"]
    ]
    written.append(write_csv(out_dir / "tensors.csv", RANK_CSV_HEADER, rows))
    if plots and summary["tensors"]:
        series = {}
        for module in sorted({t["module"] for t in summary["tensors"]}):
            group = [t for t in summary["tensors"] if t["module"] == module]
            series[module] = [
                float(np.median(known)) if (known := [t["energy"][i] for t in group if t["energy"][i] is not None]) else np.nan
                for i in range(len(summary["steps"]))
            ]
        written.append(
            save_lines_png(
                out_dir / "rank1_energy.png",
                summary["steps"],
                series,
                title=f"rank-1 energy of W_t - W_{summary['base_step']} (median per module)",
                xlabel="step",
                ylabel="sigma1² / ||Delta||_F²",
            )
        )
    return written
