"""Weight linearity against numpy/scipy on synthetic trajectories with known structure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from blocks import random_block
import torch
from safetensors.torch import save_file
from clirun import run_cli

from rlvrx.io.reader import Checkpoint
from rlvrx.errors import CheckpointError, UsageError
from rlvrx.linearity import stats
from rlvrx.linearity.kernel import Kernel
from rlvrx.linearity.naming import layer_of, module_of
from rlvrx.linearity.plan import partition_tensors, sample_indices
from rlvrx.linearity.state import WeightState, merge_states
from rlvrx.linearity.summary import PUBLIC_KEYS, summarize
from rlvrx.linearity.weights import WeightSettings, analyze_weights

STEPS = [0, 10, 20, 30, 45, 60, 80]
SHAPES = {
    "model.embed_tokens.weight": (50, 8),
    "model.layers.0.self_attn.q_proj.weight": (16, 8),
    "model.layers.0.self_attn.q_proj.bias": (16,),
    "model.layers.0.mlp.down_proj.weight": (8, 24),
    "model.layers.0.input_layernorm.weight": (8,),
    "model.layers.1.self_attn.k_proj.weight": (8, 8),
    "model.layers.1.mlp.up_proj.weight": (24, 8),
    "model.norm.weight": (8,),
    "lm_head.weight": (50, 8),
}


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], n_files: int = 3) -> Path:
    """A sharded HF-style checkpoint: tensors spread over n_files safetensors files plus an index."""
    path.mkdir(parents=True)
    names = list(tensors)
    weight_map = {}
    for f in range(n_files):
        chunk = {n: tensors[n].contiguous() for i, n in enumerate(names) if i % n_files == f}
        if chunk:
            file = f"model-{f + 1:05d}-of-{n_files:05d}.safetensors"
            save_file(chunk, str(path / file))
            weight_map.update({n: file for n in chunk})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def write_trajectory(root: Path, series: dict[str, np.ndarray], steps=STEPS, dtype=torch.float32, run: bool = False, kinds=None):
    """series[name]: array [K, *shape]. Returns [(step, Checkpoint)] (and writes trajectory.json when run)."""
    out = []
    entries = []
    for k, step in enumerate(steps):
        path = write_checkpoint(
            root / "checkpoints" / f"step_{step:06d}", {n: torch.from_numpy(np.ascontiguousarray(v[k])).to(dtype) for n, v in series.items()}
        )
        out.append((step, Checkpoint(path)))
        entries.append({"step": step, "path": str(path.relative_to(root)), "kind": (kinds or {}).get(step, "base" if k == 0 else "rl")})
    if run:
        (root / "trajectory.json").write_text(json.dumps(entries))
    return out


def noisy_lines(seed: int, steps=STEPS, noise: float = 0.3, shapes=SHAPES) -> dict[str, np.ndarray]:
    """value = a + b*step + noise: a spread of R² values."""
    rng = np.random.default_rng(seed)
    t = np.asarray(steps, dtype=np.float64)
    out = {}
    for name, shape in shapes.items():
        a = rng.normal(size=shape)
        b = rng.normal(size=shape) * 1e-2
        eps = rng.normal(size=(len(t), *shape)) * noise * rng.uniform(0, 1, size=shape)
        out[name] = a + b * t.reshape(-1, *[1] * len(shape)) + eps
    return out


def numpy_r2(series: np.ndarray, steps=STEPS) -> np.ndarray:
    """R² per parameter by np.corrcoef, one parameter at a time (NaN for constants)."""
    flat = series.reshape(len(steps), -1)
    out = np.empty(flat.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        for j in range(flat.shape[1]):
            out[j] = np.corrcoef(np.asarray(steps, dtype=np.float64), flat[:, j])[0, 1] ** 2
    return out


def stored(series: dict[str, np.ndarray], dtype=torch.float32) -> dict[str, np.ndarray]:
    """The values as the checkpoints store them (rounded to dtype), in float64."""
    return {n: torch.from_numpy(v).to(dtype).double().numpy() for n, v in series.items()}


def everything(**kw) -> WeightSettings:
    """Keep every parameter's R² value (sample fraction 1) and no filters unless given."""
    return WeightSettings(**{"sample": 1.0, "min_abs_change": 0.0, "min_unique": 1, **kw})


# ----------------------------------------------------------------------------------------------


def test_module_and_layer_names():
    assert [module_of(n) for n in SHAPES] == ["embed", "q", "q", "down", "norm", "k", "up", "norm", "head"]
    assert [layer_of(n) for n in SHAPES] == [None, 0, 0, 0, 0, 1, 1, None, None]


def test_r2_columns_matches_scipy_linregress():
    rng = np.random.default_rng(1)
    y = rng.normal(size=(len(STEPS), 120)) + np.outer(STEPS, rng.normal(size=120)) * 0.02
    r2, _ = stats.r2_columns(y, STEPS)
    try:
        from scipy.stats import linregress

        expected = np.array([linregress(STEPS, y[:, j]).rvalue ** 2 for j in range(y.shape[1])])
    except ImportError:  # pragma: no cover
        expected = numpy_r2(y)
    np.testing.assert_allclose(r2, expected, rtol=0, atol=1e-10)
    assert r2.min() < 0.2 and r2.max() > 0.85  # a real spread, not a degenerate case


def test_exact_lines_give_r2_one(tmp_path):
    rng = np.random.default_rng(0)
    t = np.asarray(STEPS, dtype=np.float64)
    series = {n: rng.normal(size=s) + rng.normal(size=s) * 1e-2 * t.reshape(-1, *[1] * len(s)) for n, s in SHAPES.items()}
    ckpts = write_trajectory(tmp_path, series, dtype=torch.float64)
    summary = summarize(analyze_weights(ckpts, everything()))
    assert summary["n_params"] == sum(math.prod(s) for s in SHAPES.values())
    assert summary["frac_r2_gt_0_9"] == 1.0 and summary["frac_r2_gt_0_7"] == 1.0
    assert abs(summary["mean_r2"] - 1.0) < 1e-12
    assert abs(summary["median_r2"] - 1.0) < 1e-12
    # Exactly linear motion: every delta points the same way and the line predicts the last step.
    assert abs(summary["direction_cosine"] - 1.0) < 1e-12
    assert summary["holdout_rel_error"] < 1e-9


def test_pure_noise_matches_numpy_per_parameter(tmp_path):
    rng = np.random.default_rng(2)
    series = {n: rng.normal(size=(len(STEPS), *s)) for n, s in SHAPES.items()}
    ckpts = write_trajectory(tmp_path, series)
    state = analyze_weights(ckpts, everything())
    values = stored(series)
    for record in state.tensors:
        np.testing.assert_allclose(record.values, numpy_r2(values[record.name]), rtol=0, atol=1e-10)
    summary = summarize(state)
    all_r2 = np.concatenate([numpy_r2(values[n]) for n in SHAPES])
    assert summary["median_r2"] == pytest.approx(float(np.median(all_r2)), abs=1e-15)
    assert summary["median_r2"] < 0.25  # noise: no linear trend (median of Beta(1/2, 5/2) is ~0.09)
    assert summary["frac_r2_gt_0_7"] == int((all_r2 > 0.7).sum()) / all_r2.size
    # Full coverage (histogram medians) agrees with the exact values within the documented resolution.
    full = summarize(analyze_weights(ckpts, everything(sample=None)))
    assert abs(full["median_r2"] - float(np.median(all_r2))) <= 1.0 / stats.FINE_BINS
    assert full["mean_r2"] == pytest.approx(float(all_r2.mean()), abs=1e-12)
    assert full["n_params"] == all_r2.size
    for entry in full["tensors"]:
        exact = float(np.median(numpy_r2(values[entry["name"]])))
        assert abs(entry["median_r2"] - exact) <= 1.0 / stats.FINE_BINS, entry["name"]


def test_known_fraction_mix(tmp_path):
    """30% of parameters move on a line, 70% go down and back up symmetrically (R² = 0 exactly)."""
    steps = [0, 10, 20, 30, 40, 50, 60]
    t = np.asarray(steps, dtype=np.float64)
    rng = np.random.default_rng(3)
    n = 1000
    linear = rng.normal(size=n) + np.outer(t, rng.uniform(0.5, 1.0, size=n)) * 1e-2
    vee = rng.normal(size=n) + np.outer(np.abs(t - 30), rng.uniform(0.5, 1.0, size=n)) * 1e-2
    is_linear = rng.permutation(n) < 300
    mixed = np.where(is_linear, linear, vee).reshape(len(steps), 40, 25)
    ckpts = write_trajectory(tmp_path, {"model.layers.0.mlp.gate_proj.weight": mixed}, steps=steps, dtype=torch.float64)
    summary = summarize(analyze_weights(ckpts, WeightSettings()))
    assert summary["n_params"] == n and summary["n_filtered"] == 0
    assert summary["frac_r2_gt_0_7"] == 0.3
    assert summary["frac_r2_gt_0_9"] == 0.3
    assert summary["mean_r2"] == pytest.approx(0.3, abs=1e-9)
    assert summary["median_r2"] <= 1.0 / stats.FINE_BINS  # the median parameter is a "V": R² = 0


def test_filters_are_counted_and_never_nan(tmp_path):
    steps = STEPS
    k = len(steps)
    rng = np.random.default_rng(4)
    good = rng.normal(size=(k, 10)) + np.outer(steps, np.ones(10)) * 1e-2  # kept
    constant = np.repeat(rng.normal(size=(1, 7)), k, axis=0)  # constant
    tiny = rng.normal(size=(1, 5)) + rng.uniform(0, 5e-5, size=(k, 5))  # max - min < 1e-4
    few = rng.normal(size=(1, 6)) + np.array([0, 1, 0, 1, 2, 1, 0])[:, None] * 0.1  # 3 distinct values
    values = np.concatenate([good, constant, tiny, few], axis=1)
    ckpts = write_trajectory(tmp_path, {"w.weight": values}, dtype=torch.float64)
    summary = summarize(analyze_weights(ckpts, WeightSettings()))
    assert summary["filters"] == {"constant": 7, "min_abs_change": 5, "min_unique": 6}
    assert summary["n_filtered"] == 18 and summary["n_params"] == 10
    expected = numpy_r2(good, steps)
    assert summary["mean_r2"] == pytest.approx(float(expected.mean()), abs=1e-12)
    # Loosening a filter lets those parameters in; constants stay out whatever the settings.
    loose = summarize(analyze_weights(ckpts, WeightSettings(min_abs_change=0.0, min_unique=1)))
    assert loose["filters"] == {"constant": 7, "min_abs_change": 0, "min_unique": 0}
    assert loose["n_params"] == 21
    assert all(math.isfinite(loose[key]) for key in ("mean_r2", "median_r2", "frac_r2_gt_0_7"))
    # A trajectory where nothing survives reports None, not NaN.
    flat = summarize(analyze_weights(write_trajectory(tmp_path / "flat", {"w.weight": constant}), WeightSettings()))
    assert flat["n_params"] == 0 and flat["mean_r2"] is None and flat["median_r2"] is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2])
def test_narrow_float_checkpoints(tmp_path, dtype):
    """Every stored format the kernel decodes (bf16 by a shift, fp16 and fp8 by a table) against numpy,
    sampled and full coverage."""
    series = noisy_lines(5, shapes={"model.layers.0.self_attn.v_proj.weight": (32, 16)}, noise=0.05)
    ckpts = write_trajectory(tmp_path, series, dtype=dtype)
    settings = WeightSettings(sample=1.0, min_abs_change=0.0, min_unique=1)
    state = analyze_weights(ckpts, settings)
    values = stored(series, dtype)["model.layers.0.self_attn.v_proj.weight"]
    expected = numpy_r2(values)
    defined = np.isfinite(expected)
    assert defined.sum() > 400
    np.testing.assert_allclose(state.tensors[0].values, expected[defined], rtol=0, atol=1e-10)
    full = analyze_weights(ckpts, WeightSettings(min_abs_change=0.0, min_unique=1)).tensors[0]
    assert full.n == int(defined.sum()) and full.sum_r2 == pytest.approx(float(expected[defined].sum()), rel=1e-12)


def test_blocks_do_not_change_results(tmp_path):
    series = noisy_lines(6)
    ckpts = write_trajectory(tmp_path, series)
    one = summarize(analyze_weights(ckpts, WeightSettings()))
    # 60-element blocks: every matrix is read in several row blocks (the 50x8 embedding in 7).
    many = summarize(analyze_weights(ckpts, WeightSettings(max_block_elements=60)))
    from rlvrx.linearity.plan import block_elements

    assert block_elements(len(STEPS), 4, 512) > 400  # the default reads each tensor here in one block
    for key in ("n_params", "n_filtered", "frac_r2_gt_0_7", "frac_r2_gt_0_9", "median_r2"):
        assert one[key] == many[key], key
    for key in ("mean_r2", "direction_cosine", "holdout_rel_error"):
        assert one[key] == pytest.approx(many[key], rel=1e-12), key


def test_direction_cosine_and_holdout_match_numpy(tmp_path):
    series = noisy_lines(7, noise=0.05)
    ckpts = write_trajectory(tmp_path, series)
    summary = summarize(analyze_weights(ckpts, WeightSettings()))
    values = stored(series)
    t = np.asarray(STEPS, dtype=np.float64)
    k = len(STEPS)
    dots = np.zeros(k - 2)
    sq = np.zeros(k - 1)
    err_total = last_total = whole_total = 0.0
    by_name = {e["name"]: e for e in summary["tensors"]}
    for name, v in values.items():
        flat = v.reshape(k, -1)
        deltas = np.diff(flat, axis=0)
        d_dots = np.einsum("ij,ij->i", deltas[:-1], deltas[1:])
        d_sq = np.einsum("ij,ij->i", deltas, deltas)
        cos = d_dots / np.sqrt(d_sq[:-1] * d_sq[1:])
        assert by_name[name]["direction_cosine"] == pytest.approx(float(cos.mean()), rel=1e-10)
        coef = np.polyfit(t[:-1], flat[:-1], 1)  # [2, n]: slope, intercept per parameter
        predicted = coef[0] * t[-1] + coef[1]
        err = np.sum((predicted - flat[-1]) ** 2)
        last = np.sum((flat[-1] - flat[-2]) ** 2)
        assert by_name[name]["holdout_rel_error"] == pytest.approx(math.sqrt(err / last), rel=1e-8)
        dots += d_dots
        sq += d_sq
        err_total += err
        last_total += last
        whole_total += np.sum((flat[-1] - flat[0]) ** 2)
    overall = dots / np.sqrt(sq[:-1] * sq[1:])
    assert summary["direction_cosine"] == pytest.approx(float(overall.mean()), rel=1e-10)
    assert summary["holdout_rel_error"] == pytest.approx(math.sqrt(err_total / last_total), rel=1e-8)
    assert summary["holdout_rel_error_total"] == pytest.approx(math.sqrt(err_total / whole_total), rel=1e-8)
    assert 0 < summary["holdout_rel_error"] < 1 and 0 < summary["direction_cosine"] < 1


def test_sampling_reproducible_and_independent_of_shards(tmp_path):
    series = noisy_lines(8)
    ckpts = write_trajectory(tmp_path, series)
    settings = WeightSettings(sample=0.1, min_per_tensor=12, seed=3, min_abs_change=0.0, min_unique=1)
    a = analyze_weights(ckpts, settings)
    b = analyze_weights(ckpts, settings)
    other = analyze_weights(ckpts, WeightSettings(sample=0.1, min_per_tensor=12, seed=4, min_abs_change=0.0, min_unique=1))
    values = stored(series)
    differ = 0
    for ra, rb, _ro in zip(a.tensors, b.tensors, other.tensors):
        numel = math.prod(SHAPES[ra.name])
        assert ra.n_examined == min(numel, max(12, round(0.1 * numel)))
        np.testing.assert_array_equal(ra.values, rb.values)
        # The sampled values are exactly numpy's R² at the seeded positions.
        idx = sample_indices(ra.name, numel, 0.1, 12, 3)
        np.testing.assert_allclose(ra.values, numpy_r2(values[ra.name])[idx], rtol=0, atol=1e-10)
        differ += not np.array_equal(sample_indices(ra.name, numel, 0.1, 12, 3), sample_indices(ra.name, numel, 0.1, 12, 4))
    assert differ >= 5  # another seed picks other parameters
    parts = [analyze_weights(ckpts, settings, shard=(i, 3)) for i in range(3)]
    sharded = {t.name: t.values for p in parts for t in p.tensors}
    assert sorted(sharded) == sorted(t.name for t in a.tensors)
    for record in a.tensors:
        np.testing.assert_array_equal(sharded[record.name], record.values)


def test_partition_tensors_is_disjoint_and_balanced():
    sizes = [(f"t{i}", s) for i, s in enumerate([100, 1, 50, 50, 30, 20, 7, 7, 90, 3])]
    shards = partition_tensors(sizes, 3)
    names = [n for shard in shards for n in shard]
    assert sorted(names) == sorted(n for n, _ in sizes) and len(names) == len(set(names))
    loads = sorted(sum(dict(sizes)[n] for n in shard) for shard in shards)
    assert loads == [118, 120, 120]  # greedy largest-first onto the lightest shard
    assert partition_tensors(sizes, 3) == shards
    assert partition_tensors(sizes, 1) == [[n for n, _ in sizes]]


@pytest.mark.parametrize("sample", [None, 0.2])
def test_shard_and_merge_reproduce_one_run(tmp_path, sample):
    ckpts = write_trajectory(tmp_path, noisy_lines(9))
    settings = WeightSettings(sample=sample, min_per_tensor=10)
    single = summarize(analyze_weights(ckpts, settings))
    parts = [analyze_weights(ckpts, settings, shard=(i, 4)) for i in (2, 0, 3, 1)]
    assert sum(len(p.tensors) for p in parts) == len(SHAPES)
    # Through JSON, as part files travel between processes.
    loaded = [WeightState.from_json(json.loads(json.dumps(p.to_json()))) for p in parts]
    merged = summarize(merge_states(loaded))
    single.pop("shards")
    merged.pop("shards")
    assert merged == single  # every number equal, not just close
    with pytest.raises(UsageError, match="missing \\[1\\]"):
        merge_states([loaded[0], loaded[1], loaded[2]])
    with pytest.raises(UsageError, match="also in"):
        merge_states([loaded[0], loaded[0]])


def test_structure_mismatch_and_too_few_checkpoints(tmp_path):
    series = noisy_lines(10, shapes={"a.weight": (4, 4), "b.weight": (3,)})
    ckpts = write_trajectory(tmp_path, series)
    with pytest.raises(UsageError, match="at least 3"):
        analyze_weights(ckpts[:2])
    with pytest.raises(UsageError, match="appears twice"):
        analyze_weights([ckpts[0], ckpts[1], (ckpts[1][0], ckpts[2][1])])
    with pytest.raises(UsageError, match="increasing"):
        analyze_weights([ckpts[1], ckpts[0], ckpts[2]])
    odd = write_checkpoint(tmp_path / "odd", {"a.weight": torch.zeros(4, 5), "b.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="a.weight has shape"):
        analyze_weights(ckpts[:3] + [(500, Checkpoint(odd))])


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_weights_on_run_dir_writes_json_and_plots(tmp_path):
    steps = [0, 10, 20, 30, 40]
    series = noisy_lines(11, steps=steps)
    run = tmp_path / "run"
    write_trajectory(run, series, steps=steps, run=True, kinds={40: "extrapolated"})
    out_json = tmp_path / "w.json"
    result_code, result_out, result_err = run_cli("linearity", "weights", str(run), "--json", str(out_json))
    assert result_code == 0, result_out + result_err
    data = json.loads(out_json.read_text())
    assert tuple(data) == PUBLIC_KEYS
    assert data["steps"] == [0, 10, 20, 30]  # extrapolated checkpoints are left out by default
    assert [t["name"] for t in data["tensors"]] == Checkpoint(run / "checkpoints" / "step_000000").names()
    assert sorted(t["name"] for t in data["tensors"]) == sorted(SHAPES)
    assert set(data["tensors"][0]) >= {"name", "n", "mean_r2", "median_r2"}
    out = run / "linearity" / "weights"
    for png in ("r2_hist.png", "r2_heatmap.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_lines = (out / "tensors.csv").read_text().splitlines()
    assert csv_lines[0].startswith("name,module,layer") and len(csv_lines) == len(SHAPES) + 1
    assert "weight R² by module type" in result_out and "median R²" in result_out
    values = stored(series)
    all_r2 = np.concatenate([numpy_r2(values[n][:4], [0, 10, 20, 30]) for n in SHAPES])
    assert abs(data["median_r2"] - float(np.median(all_r2))) <= 1.0 / stats.FINE_BINS

    result_code, result_out, result_err = run_cli(
        "linearity", "weights", str(run), "--include-extrapolated", "--window", "10:", "--json", str(out_json), "--no-plots"
    )
    assert result_code == 0, result_out + result_err
    assert json.loads(out_json.read_text())["steps"] == [10, 20, 30, 40]


def test_cli_shards_then_merge_equal_single_run(tmp_path):
    series = noisy_lines(12)
    ckpts = write_trajectory(tmp_path / "t", series)
    pairs = [arg for step, c in ckpts for arg in ("--checkpoint", f"{step}={c.path}")]
    single = tmp_path / "single.json"
    result_code, result_out, result_err = run_cli("linearity", "weights", *pairs, "--out", str(tmp_path / "one"), "--json", str(single), "--no-plots")
    assert result_code == 0, result_out + result_err
    parts = []
    for i in range(3):
        part = tmp_path / "parts" / f"p{i}.json"
        result_code, result_out, result_err = run_cli(
            "linearity", "weights", *pairs, "--shard", f"{i}/3", "--out", str(tmp_path / "parts"), "--json", str(part)
        )
        assert result_code == 0, result_out + result_err
        parts.append(str(part))
    merged = tmp_path / "merged.json"
    result_code, result_out, result_err = run_cli("linearity", "merge", *parts, "--json", str(merged))
    assert result_code == 0, result_out + result_err
    assert json.loads(merged.read_text()) == json.loads(single.read_text())
    assert (tmp_path / "parts" / "r2_heatmap.png").is_file()
    bogus_code, bogus_out, bogus_err = run_cli("linearity", "merge", parts[0], str(single), "--json", str(merged))
    assert bogus_code == 2 and "not a weight-linearity part file" in bogus_err
    missing_code, missing_out, missing_err = run_cli("linearity", "merge", parts[0], parts[2], "--json", str(merged))
    assert missing_code == 2 and "missing [1]" in missing_err


def test_cli_bad_input(tmp_path):
    ckpts = write_trajectory(tmp_path, noisy_lines(13, shapes={"a.weight": (3, 3)}))
    pairs = [f"{step}={c.path}" for step, c in ckpts]
    unsorted_code, unsorted_out, unsorted_err = run_cli("linearity", "weights", "-c", pairs[1], "-c", pairs[0], "-c", pairs[2])
    assert unsorted_code == 2 and "increasing order" in unsorted_err
    dup_code, dup_out, dup_err = run_cli("linearity", "weights", "-c", pairs[0], "-c", pairs[0], "-c", pairs[2])
    assert dup_code == 2 and "duplicate" in dup_err
    shard_code, shard_out, shard_err = run_cli("linearity", "weights", "-c", pairs[0], "-c", pairs[1], "-c", pairs[2], "--shard", "3/3")
    assert shard_code == 2 and "0-based" in shard_err
    # End to end through the real entry point: one line, exit code 2, no traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "rlvrx", "linearity", "weights", "-c", pairs[0], "-c", pairs[1]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "at least 3 checkpoints" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("dtype", "sample"), [(torch.float32, None), (torch.bfloat16, None), (torch.float16, 1.0)])
def test_non_finite_weights_are_refused_with_tensor_and_steps(tmp_path, dtype, sample):
    series = noisy_lines(14, shapes={"model.layers.0.mlp.up_proj.weight": (40, 30), "model.layers.1.mlp.up_proj.weight": (8,)})
    bad = series["model.layers.1.mlp.up_proj.weight"]
    bad[2, 3] = np.nan  # step 20
    bad[4, 3] = np.inf  # step 45
    bad[4, 4] = -np.inf
    ckpts = write_trajectory(tmp_path, series, dtype=dtype)
    with pytest.raises(CheckpointError) as error:
        analyze_weights(ckpts, WeightSettings(sample=sample, max_block_elements=5))
    message = str(error.value)
    assert message == "model.layers.1.mlp.up_proj.weight: 2 parameters are NaN or infinite at steps 20, 45; weight linearity needs finite weights"
    # End to end: one line, a non-zero exit, no traceback, nothing written.
    pairs = [arg for step, c in ckpts for arg in ("-c", f"{step}={c.path}")]
    proc = subprocess.run(
        [sys.executable, "-m", "rlvrx", "linearity", "weights", *pairs, "--no-plots", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and "NaN or infinite at steps 20, 45" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# 16-bit checkpoints, blocks and threads against float64 numpy


def bf16_mix(seed: int, steps=STEPS) -> dict[str, np.ndarray]:
    """bf16-representable trajectories that hit every branch: a spread of R², parameters stuck on a few
    bf16 values, constants, changes below 1e-4, and a middle checkpoint far from the rest, over several
    tensors."""
    rng = np.random.default_rng(seed)
    t = np.asarray(steps, dtype=np.float64)
    k = len(t)
    out = {}
    lines = rng.normal(size=(64, 48)) * 0.02 + np.multiply.outer(t, rng.normal(size=(64, 48)) * 2e-4)
    lines += rng.normal(size=(k, 64, 48)) * 2e-3 * rng.uniform(0, 1, size=(64, 48))
    out["model.layers.0.mlp.up_proj.weight"] = lines
    few = 1.0 + rng.integers(0, 3, size=(k, 40, 8)) * 2.0**-7  # 1, 3 or more distinct bf16 values near 1
    few[:, :, :2] = 1.0  # constant
    few[:, :, 2:3] += (np.arange(k) % 2)[:, None, None] * 2.0**-8 * 0  # still constant
    out["model.layers.0.input_layernorm.weight"] = few
    tiny = rng.normal(size=(30,)) * 0.02
    tiny = np.repeat(tiny[None], k, axis=0) + rng.integers(0, 2, size=(k, 30)) * 2.0**-17  # max - min < 1e-4
    out["model.layers.1.self_attn.q_proj.bias"] = tiny
    spike = rng.normal(size=(50, 16)) * 0.02 + rng.normal(size=(k, 50, 16)) * 1e-3
    spike[k // 2] += 0.5  # one checkpoint is an outlier
    out["model.layers.1.self_attn.o_proj.weight"] = spike
    return {n: torch.from_numpy(v).to(torch.bfloat16).double().numpy() for n, v in out.items()}


def numpy_filters(flat: np.ndarray, min_abs_change=1e-4, min_unique=4):
    """(constant, small, few, kept mask) per column of [K, n], in float64 like the exact path."""
    span = flat.max(axis=0) - flat.min(axis=0)
    constant = span == 0
    small = ~constant & (span < min_abs_change)
    unique = np.array([np.unique(flat[:, j]).size for j in range(flat.shape[1])])
    few = ~constant & ~small & (unique < min_unique)
    return constant, small, few, ~(constant | small | few)


def test_bf16_full_coverage_matches_float64(tmp_path):
    series = bf16_mix(20)
    ckpts = write_trajectory(tmp_path, series, dtype=torch.bfloat16)
    summary = summarize(analyze_weights(ckpts, WeightSettings(max_block_elements=500, threads=2)))
    k = len(STEPS)
    filters = {"constant": 0, "min_abs_change": 0, "min_unique": 0}
    kept_r2 = []
    for v in series.values():
        flat = v.reshape(k, -1)
        constant, small, few, kept = numpy_filters(flat)
        filters["constant"] += int(constant.sum())
        filters["min_abs_change"] += int(small.sum())
        filters["min_unique"] += int(few.sum())
        kept_r2.append(numpy_r2(flat)[kept])
    r2 = np.concatenate(kept_r2)
    assert all(filters.values())  # every filter is exercised
    assert summary["filters"] == filters
    assert summary["n_params"] == r2.size
    assert summary["frac_r2_gt_0_7"] == int((r2 > 0.7).sum()) / r2.size
    assert summary["frac_r2_gt_0_9"] == int((r2 > 0.9).sum()) / r2.size
    assert summary["mean_r2"] == pytest.approx(float(r2.mean()), abs=1e-12)
    assert abs(summary["median_r2"] - float(np.median(r2))) <= 1.0 / stats.FINE_BINS
    assert 0.05 < float(np.median(r2)) < 0.95 and r2.min() < 0.1 and r2.max() > 0.99


def test_bf16_full_coverage_histogram_equals_the_exact_values(tmp_path):
    """Sample fraction 1 keeps every R² (float64, against numpy); full coverage bins the same values."""
    series = {"model.layers.0.mlp.up_proj.weight": bf16_mix(21)["model.layers.0.mlp.up_proj.weight"]}
    ckpts = write_trajectory(tmp_path, series, dtype=torch.bfloat16)
    exact = analyze_weights(ckpts, WeightSettings(sample=1.0))
    fast = analyze_weights(ckpts, WeightSettings())
    flat = series["model.layers.0.mlp.up_proj.weight"].reshape(len(STEPS), -1)
    np.testing.assert_allclose(exact.tensors[0].values, numpy_r2(flat)[numpy_filters(flat)[3]], rtol=0, atol=1e-10)
    expected = np.bincount(stats.bin_index(exact.tensors[0].values, stats.FINE_BINS), minlength=stats.FINE_BINS)
    np.testing.assert_array_equal(fast.hists["module:up"], expected)
    assert fast.tensors[0].sum_r2 == pytest.approx(exact.tensors[0].sum_r2, rel=1e-13)
    assert fast.tensors[0].n_gt_0_7 == exact.tensors[0].n_gt_0_7 and fast.tensors[0].n_gt_0_9 == exact.tensors[0].n_gt_0_9


@pytest.mark.parametrize("sample", [None, 0.3])
def test_threads_do_not_change_results(tmp_path, sample):
    series = bf16_mix(22)
    ckpts = write_trajectory(tmp_path, series, dtype=torch.bfloat16)
    runs = [summarize(analyze_weights(ckpts, WeightSettings(sample=sample, max_block_elements=300, threads=n))) for n in (1, 3)]
    assert runs[0] == runs[1]


def test_sampled_diagnostics_are_those_of_the_sample(tmp_path):
    series = noisy_lines(23, noise=0.05)
    ckpts = write_trajectory(tmp_path, series)
    settings = WeightSettings(sample=0.2, min_per_tensor=10, seed=5)
    state = analyze_weights(ckpts, settings)
    values = stored(series)
    k = len(STEPS)
    dots, sq = np.zeros(k - 2), np.zeros(k - 1)
    for record in state.tensors:
        flat = values[record.name].reshape(k, -1)
        idx = sample_indices(record.name, flat.shape[1], 0.2, 10, 5)
        deltas = np.diff(flat[:, idx], axis=0)
        np.testing.assert_allclose(record.delta_sq, np.einsum("ij,ij->i", deltas, deltas), rtol=1e-10)
        np.testing.assert_allclose(record.delta_dot, np.einsum("ij,ij->i", deltas[:-1], deltas[1:]), rtol=1e-9, atol=1e-12)
        dots += np.einsum("ij,ij->i", deltas[:-1], deltas[1:])
        sq += np.einsum("ij,ij->i", deltas, deltas)
    assert summarize(state)["direction_cosine"] == pytest.approx(float((dots / np.sqrt(sq[:-1] * sq[1:])).mean()), rel=1e-10)


def test_weight_linearity_runs_without_torch(tmp_path):
    """Reading checkpoints and the statistics never import torch (whose import costs more than a
    sampled run's work); the results equal those of this process, which has torch loaded."""
    series = noisy_lines(31, shapes={"model.layers.0.mlp.up_proj.weight": (24, 16), "lm_head.weight": (9, 16)})
    ckpts = write_trajectory(tmp_path, series, dtype=torch.bfloat16)
    pairs = [(step, str(c.path)) for step, c in ckpts]
    code = (
        "import json, sys\n"
        "from rlvrx.io.reader import Checkpoint\n"
        "from rlvrx.linearity.summary import summarize\n"
        "from rlvrx.linearity.weights import WeightSettings, analyze_weights\n"
        f"ckpts = [(s, Checkpoint(p)) for s, p in {pairs!r}]\n"
        "out = [summarize(analyze_weights(ckpts, WeightSettings(sample=s))) for s in (None, 0.5)]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    here = [summarize(analyze_weights(ckpts, WeightSettings(sample=s))) for s in (None, 0.5)]
    assert json.loads(proc.stdout) == json.loads(json.dumps(here))


@pytest.mark.parametrize("dtype_name", ["BF16", "F32", "F16"])
@pytest.mark.parametrize(
    ("steps", "min_abs_change", "min_unique"), [(STEPS, 1e-4, 4), (STEPS, 0.0, 1), ([0, 5, 9], 1e-4, 3), (list(range(0, 90, 10)), 1e-4, 7)]
)
def test_kernel_widths_give_the_same_bits(steps, min_abs_change, min_unique, dtype_name):
    """The AVX-512 build (8 parameters per vector) and the 4-lane build agree bit for bit, filters, sums,
    histogram and every kept R²; 1001 parameters cover several tiles and a ragged end."""
    from rlvrx import kernels as native

    if native.library().rlvrx_weight_block_lanes() == 4:
        pytest.skip("this CPU has no AVX-512: there is one build to run")
    values = random_block(steps, seed=len(steps) * 10 + min_unique)
    numpy_dtype = {"BF16": None, "F32": np.float32, "F16": np.float16}[dtype_name]
    if numpy_dtype is None:
        raw = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        raw = values.astype(numpy_dtype)
    rows = [np.ascontiguousarray(r) for r in raw]
    kernel = Kernel(steps, dtype_name, WeightSettings(min_abs_change=min_abs_change, min_unique=min_unique))
    results = []
    for entry in (native.library().rlvrx_weight_block, native.library().rlvrx_weight_block_4):
        kernel.entry = entry
        hist = np.zeros(stats.FINE_BINS, np.int64)
        results.append((kernel.run(rows, hist, values=True), hist))
    (wide, wide_hist), (narrow, narrow_hist) = results
    assert wide["n"] > 300 and wide["constant"] >= 101 and (wide["min_unique"] > 0) == (min_unique > 1)
    np.testing.assert_array_equal(wide_hist, narrow_hist)
    for key in wide:
        np.testing.assert_array_equal(np.atleast_1d(wide[key]).view(np.uint8), np.atleast_1d(narrow[key]).view(np.uint8), err_msg=key)
