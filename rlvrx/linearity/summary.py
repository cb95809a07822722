"""Summaries of a `WeightState`: the public keys, then breakdowns by filter, module, layer and cell."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from rlvrx.linearity import stats
from rlvrx.linearity.naming import MODULES
from rlvrx.linearity.state import FILTERS, TensorStats, WeightState


def _direction(records: Sequence[TensorStats]) -> tuple[float | None, list[float | None]]:
    """Mean over successive delta pairs of cos(d_i, d_{i+1}) pooled over the records, and the per-pair values."""
    if not records or not records[0].delta_dot:
        return None, []
    pairs = []
    for i in range(len(records[0].delta_dot)):
        dot = math.fsum(r.delta_dot[i] for r in records)
        a = math.fsum(r.delta_sq[i] for r in records)
        b = math.fsum(r.delta_sq[i + 1] for r in records)
        pairs.append(dot / math.sqrt(a * b) if a > 0 and b > 0 else None)
    defined = [p for p in pairs if p is not None]
    return (math.fsum(defined) / len(defined) if defined else None), pairs


def _holdout(records: Sequence[TensorStats], versus: str = "last") -> float | None:
    """|prediction - W_K| relative to the last step's change (versus="last") or to |W_K - W_1| ("total")."""
    err = math.fsum(r.holdout_err_sq for r in records)
    if versus == "total":
        scale = math.fsum(r.total_sq for r in records)
    else:
        scale = math.fsum(r.delta_sq[-1] for r in records) if records and records[0].delta_sq else 0.0
    return math.sqrt(err / scale) if scale > 0 else None


def _group(records: Sequence[TensorStats], counts: np.ndarray | None, sampled: bool) -> dict:
    n = sum(r.n for r in records)
    if sampled:
        values = [r.values for r in records if r.values is not None and r.values.size]
        median = float(np.median(np.concatenate(values))) if values else None
    else:
        median = stats.histogram_median(counts) if counts is not None else None
    direction, _ = _direction(records)
    return {
        "n": n,
        "n_filtered": sum(r.n_filtered for r in records),
        "mean_r2": math.fsum(r.sum_r2 for r in records) / n if n else None,
        "median_r2": median if n else None,
        "frac_r2_gt_0_7": sum(r.n_gt_0_7 for r in records) / n if n else None,
        "frac_r2_gt_0_9": sum(r.n_gt_0_9 for r in records) / n if n else None,
        "direction_cosine": direction,
        "holdout_rel_error": _holdout(records),
        "holdout_rel_error_total": _holdout(records, "total"),
    }


def _layer_key(layer: int | None) -> str:
    return "-" if layer is None else str(layer)


def summarize(state: WeightState) -> dict:
    """The full result: the public keys first, then breakdowns by filter, module, layer and cell."""
    records = sorted(state.tensors, key=lambda t: t.index)
    sampled = state.sampled
    module_hists = [v for k, v in state.hists.items() if k.startswith("module:")]
    global_hist = np.sum(module_hists, axis=0) if module_hists else np.zeros(stats.FINE_BINS, dtype=np.int64)
    overall = _group(records, global_hist, sampled)
    direction, pairs = _direction(records)
    tensors = []
    for r in records:
        one = _group([r], None, sampled)
        tensors.append(
            {
                "name": r.name,
                "n": r.n,
                "mean_r2": one["mean_r2"],
                "median_r2": r.median_r2,
                "n_filtered": r.n_filtered,
                "frac_r2_gt_0_7": one["frac_r2_gt_0_7"],
                "direction_cosine": one["direction_cosine"],
                "holdout_rel_error": one["holdout_rel_error"],
            }
        )
    modules = [m for m in MODULES if any(r.module == m for r in records)]
    layers = sorted({r.layer for r in records}, key=lambda l: (l is None, l if l is not None else 0))
    by_module = [{"module": m, **_group([r for r in records if r.module == m], state.hists.get(f"module:{m}"), sampled)} for m in modules]
    by_layer = [{"layer": l, **_group([r for r in records if r.layer == l], state.hists.get(f"layer:{_layer_key(l)}"), sampled)} for l in layers]
    cells = []
    for l in layers:
        for m in modules:
            members = [r for r in records if r.layer == l and r.module == m]
            if members:
                group = _group(members, state.cells.get(f"{_layer_key(l)}|{m}"), sampled)
                cells.append(
                    {
                        "layer": l,
                        "module": m,
                        "n": group["n"],
                        "median_r2": group["median_r2"],
                        "mean_r2": group["mean_r2"],
                        "frac_r2_gt_0_7": group["frac_r2_gt_0_7"],
                    }
                )
    return {
        "median_r2": overall["median_r2"],
        "mean_r2": overall["mean_r2"],
        "frac_r2_gt_0_7": overall["frac_r2_gt_0_7"],
        "frac_r2_gt_0_9": overall["frac_r2_gt_0_9"],
        "n_params": overall["n"],
        "n_filtered": overall["n_filtered"],
        "steps": state.steps,
        "tensors": tensors,
        "direction_cosine": direction,
        "holdout_rel_error": overall["holdout_rel_error"],
        # details
        "holdout_rel_error_total": overall["holdout_rel_error_total"],
        "n_examined": sum(r.n_examined for r in records),
        "filters": {f: sum(r.filtered[f] for r in records) for f in FILTERS},
        "settings": state.settings,
        "median_resolution": None if sampled else 1.0 / stats.FINE_BINS,
        "cell_median_resolution": None if sampled else 1.0 / stats.COARSE_BINS,
        "direction_cosine_pairs": [{"steps": state.steps[i : i + 3], "cosine": c} for i, c in enumerate(pairs)],
        "by_module": by_module,
        "by_layer": by_layer,
        "cells": cells,
        "histogram": stats.rebin(global_hist, 100).tolist(),
        "skipped_tensors": state.skipped,
        "shards": {"covered": state.shards, "of": state.n_shards},
    }


PUBLIC_KEYS = (
    "median_r2",
    "mean_r2",
    "frac_r2_gt_0_7",
    "frac_r2_gt_0_9",
    "n_params",
    "n_filtered",
    "steps",
    "tensors",
    "direction_cosine",
    "holdout_rel_error",
)


def public_json(summary: dict) -> dict:
    """The `--json` document: exactly the documented top-level keys."""
    return {key: summary[key] for key in PUBLIC_KEYS}
