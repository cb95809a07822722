"""The result of a weight-linearity run as data: per-tensor records, histograms, the part-file format and merge.

States of disjoint tensor shards merge exactly (integers add, float sums are combined with math.fsum,
which is order-independent; a tensor's blocks never depend on the shard or the threads).
"""

from __future__ import annotations

import binascii
import zlib
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from rlvrx.errors import UsageError
from rlvrx.linearity import stats

STATE_FORMAT = "rlvrx.linearity.weights/1"
FILTERS = ("constant", "min_abs_change", "min_unique")


@dataclass
class TensorStats:
    """Everything one tensor contributes; sums are float64, counts exact."""

    index: int
    name: str
    module: str
    layer: int | None
    numel: int
    n_examined: int = 0
    n: int = 0
    filtered: dict = field(default_factory=lambda: {f: 0 for f in FILTERS})
    sum_r2: float = 0.0
    n_gt_0_7: int = 0
    n_gt_0_9: int = 0
    median_r2: float | None = None
    delta_sq: list = field(default_factory=list)  # |W_{i+1} - W_i|², i = 0..K-2
    delta_dot: list = field(default_factory=list)  # <d_i, d_{i+1}>, i = 0..K-3
    holdout_err_sq: float = 0.0
    total_sq: float = 0.0  # |W_K - W_1|², the whole trajectory's change
    values: np.ndarray | None = None  # sampled mode: kept R² values in index order

    @property
    def n_filtered(self) -> int:
        return sum(self.filtered.values())

    def to_json(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k != "values"}
        if self.values is not None:
            data["values"] = stats.encode_array(self.values)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "TensorStats":
        data = dict(data)
        values = data.pop("values", None)
        out = cls(**data)
        out.values = None if values is None else stats.decode_array(values)
        return out


@dataclass
class WeightState:
    steps: list[int]
    settings: dict
    structure: dict  # fingerprint, n_tensors (float tensors in the model), numel
    n_shards: int
    shards: list[int]  # shard indices this state covers
    tensors: list[TensorStats]
    hists: dict[str, np.ndarray]  # "module:q", "layer:3", "layer:-" -> FINE_BINS counts
    cells: dict[str, np.ndarray]  # "3|q" -> COARSE_BINS counts
    skipped: list[str] = field(default_factory=list)  # non-float tensors

    @property
    def sampled(self) -> bool:
        return self.settings.get("sample") is not None

    def to_json(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "settings": self.settings,
            "structure": self.structure,
            "n_shards": self.n_shards,
            "shards": self.shards,
            "skipped": self.skipped,
            "tensors": [t.to_json() for t in self.tensors],
            "hists": {k: stats.encode_array(v) for k, v in self.hists.items()},
            "cells": {k: stats.encode_array(v) for k, v in self.cells.items()},
        }

    @classmethod
    def from_json(cls, data: dict, where: str = "part") -> "WeightState":
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT:
            raise UsageError(f"{where}: not a weight-linearity part file (write one with `rlvrx linearity weights --shard I/N`)")
        try:
            return cls(
                steps=list(data["steps"]),
                settings=dict(data["settings"]),
                structure=dict(data["structure"]),
                n_shards=int(data["n_shards"]),
                shards=list(data["shards"]),
                skipped=list(data.get("skipped", [])),
                tensors=[TensorStats.from_json(t) for t in data["tensors"]],
                hists={k: stats.decode_array(v) for k, v in data["hists"].items()},
                cells={k: stats.decode_array(v) for k, v in data["cells"].items()},
            )
        except (KeyError, TypeError, ValueError, zlib.error, binascii.Error) as exc:
            raise UsageError(f"{where}: damaged part file ({type(exc).__name__}: {exc}); rerun its shard") from None


def add_hist(store: dict[str, np.ndarray], key: str, counts: np.ndarray) -> None:
    if key in store:
        store[key] = store[key] + counts
    else:
        store[key] = counts.copy()


def merge_states(states: Sequence[WeightState], where: Sequence[str] | None = None) -> WeightState:
    """Combine states of disjoint shards; they must share steps, settings and model structure."""
    if not states:
        raise UsageError("nothing to merge: pass the part files written by `rlvrx linearity weights --shard I/N`")
    where = list(where or [f"part {i}" for i in range(len(states))])
    first = states[0]
    covered: dict[int, str] = {}
    names: dict[str, str] = {}
    for state, label in zip(states, where):
        for key in ("steps", "settings", "structure", "n_shards"):
            if getattr(state, key) != getattr(first, key):
                raise UsageError(f"{label}: {key} {getattr(state, key)} differ from {where[0]}'s {getattr(first, key)}; parts must come from one command")
        for shard in state.shards:
            if shard in covered:
                raise UsageError(f"{label}: shard {shard}/{first.n_shards} is also in {covered[shard]}")
            covered[shard] = label
        for t in state.tensors:
            if t.name in names:
                raise UsageError(f"{label}: tensor {t.name} is also in {names[t.name]}")
            names[t.name] = label
    missing = sorted(set(range(first.n_shards)) - set(covered))
    if missing:
        raise UsageError(f"the parts cover shards {sorted(covered)} of {first.n_shards}; missing {missing} (run `--shard {missing[0]}/{first.n_shards}`)")
    hists: dict[str, np.ndarray] = {}
    cells: dict[str, np.ndarray] = {}
    for state in states:
        for key, counts in state.hists.items():
            add_hist(hists, key, counts)
        for key, counts in state.cells.items():
            add_hist(cells, key, counts)
    return WeightState(
        steps=first.steps,
        settings=first.settings,
        structure=first.structure,
        n_shards=first.n_shards,
        shards=sorted(covered),
        tensors=sorted((t for s in states for t in s.tensors), key=lambda t: t.index),
        hists=dict(sorted(hists.items())),
        cells=dict(sorted(cells.items())),
        skipped=first.skipped,
    )
