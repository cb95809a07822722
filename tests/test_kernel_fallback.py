"""The fallback for installs without the compiled kernels (rlvrx.kernels.block_numpy, torch.lerp) against
the kernels: the same bits. The comparisons need the kernels, which the main lane builds; the no-compiler
lane (.ci/nocompiler-lane.sh, RLVRX_NO_COMPILER=1) runs the rest and checks that the extension is absent."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from blocks import random_block
import rlvrx.kernels as native
from rlvrx.kernels import block_numpy
from rlvrx.linearity import stats
from rlvrx.linearity.kernel import Kernel as _Kernel
from rlvrx.linearity.weights import WeightSettings

NO_COMPILER = os.environ.get("RLVRX_NO_COMPILER") == "1"
BUILT = importlib.util.find_spec("rlvrx.kernels._native") is not None


def need_kernels():
    if NO_COMPILER:
        pytest.skip("the no-compiler lane has no kernels to compare with")
    assert BUILT, "rlvrx.kernels._native is not built: the main lane needs a C compiler"


def raw_rows(values: np.ndarray, dtype_name: str) -> list[np.ndarray]:
    if dtype_name == "BF16":
        raw = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    else:
        raw = values.astype({"F32": np.float32, "F16": np.float16, "F64": np.float64}[dtype_name])
        raw = raw.view(np.uint16) if dtype_name == "F16" else raw  # as the caller's views hold it
    return [np.ascontiguousarray(r) for r in raw]


def run_both(kernel: _Kernel, rows, values: bool):
    out = []
    for entry in (native.library().rlvrx_weight_block, None):
        kernel.entry = entry
        hist = np.zeros(stats.FINE_BINS, np.int64)
        hist[::7] = 3  # the histogram accumulates
        out.append((kernel.run(rows, hist, values=values), hist))
    return out


def same_bits(a, b, what):
    np.testing.assert_array_equal(np.atleast_1d(a).view(np.uint8), np.atleast_1d(b).view(np.uint8), err_msg=what)


@pytest.mark.parametrize("chunk", [None, 40])
@pytest.mark.parametrize("dtype_name", ["BF16", "F16", "F32", "F64"])
@pytest.mark.parametrize(
    ("steps", "min_abs_change", "min_unique"),
    [([0, 10, 20, 30, 40, 50], 1e-4, 4), ([0, 10, 20, 30, 40, 50], 0.0, 1), ([0, 5, 9], 1e-4, 3), (list(range(0, 90, 10)), 1e-4, 7)],
)
def test_fallback_gives_the_kernels_bits(steps, min_abs_change, min_unique, dtype_name, chunk, monkeypatch):
    """Counts, every kept R², the histogram and the sums (R² sum, held-out error, delta norms and dot
    products): the same bits, also when the fallback splits the block into chunks (40 values: a ragged end)."""
    need_kernels()
    if chunk is not None:
        monkeypatch.setattr(block_numpy, "_CHUNK_VALUES", chunk * len(steps))
    rows = raw_rows(random_block(steps, seed=len(steps) * 10 + min_unique), dtype_name)
    kernel = _Kernel(steps, dtype_name, WeightSettings(min_abs_change=min_abs_change, min_unique=min_unique))
    for values in (True, False):
        (native_out, native_hist), (fallback, fallback_hist) = run_both(kernel, rows, values)
        assert native_out["n"] > 300 and native_out["constant"] >= 101 and native_out["non_finite"] == 0
        assert (native_out["min_unique"] > 0) == (min_unique > 1) and (native_out["min_abs_change"] > 0) == (min_abs_change > 0)
        assert native_out.keys() == fallback.keys()
        np.testing.assert_array_equal(native_hist, fallback_hist)
        for key in native_out:
            same_bits(native_out[key], fallback[key], key)


def test_fallback_r2_is_the_formula():
    """Independent of the kernel: each kept R² is numpy's squared correlation of value and step."""
    steps = [0, 10, 20, 30, 40, 50]
    values = random_block(steps, seed=3)
    kernel = _Kernel(steps, "F64", WeightSettings(min_abs_change=1e-4, min_unique=4))
    kernel.entry = None
    out = kernel.run(raw_rows(values, "F64"), None, values=True)
    constant = (values == values[0]).all(axis=0)
    small = ~constant & (np.ptp(values, axis=0) < 1e-4)
    few = ~constant & ~small & (np.array([len(set(values[:, p])) for p in range(values.shape[1])]) < 4)
    assert (out["constant"], out["min_abs_change"], out["min_unique"]) == (constant.sum(), small.sum(), few.sum())
    assert constant.sum() >= 101 and small.sum() > 50 and few.sum() > 100
    kept = ~(constant | small | few)
    want = [np.corrcoef(steps, values[:, p])[0, 1] ** 2 for p in np.flatnonzero(kept)]
    np.testing.assert_allclose(out["values"], want, rtol=0, atol=1e-12)
    assert out["above"] == (sum(w > 0.7 for w in want), sum(w > 0.9 for w in want))


@pytest.mark.parametrize("dtype_name", ["BF16", "F16", "F32", "F64"])
def test_non_finite_parameters_are_counted_alike(dtype_name):
    """NaN and ±inf at any step (and, in float64, values whose sum overflows): the same non-finite count
    as the kernel and as counted here."""
    steps = [0, 10, 20, 30, 40]
    values = random_block(steps, seed=5, n=500)
    big = {"BF16": 3e38, "F16": 60000.0, "F32": 3e38, "F64": 1.7e308}[dtype_name]
    values[2, 10], values[0, 11], values[4, 12] = math.nan, math.inf, -math.inf
    values[1, 13], values[3, 13] = math.inf, -math.inf
    values[:, 14] = big  # float64 mean: finite below float64's overflow, inf for F64
    rows = raw_rows(values, dtype_name)
    stored = np.array([_Kernel(steps, dtype_name, WeightSettings()).as_float(r) for r in rows], dtype=np.float64)
    with np.errstate(all="ignore"):
        want = int((~np.isfinite(stored.sum(axis=0))).sum())
    assert want == (5 if dtype_name == "F64" else 4)
    kernel = _Kernel(steps, dtype_name, WeightSettings())
    kernel.entry = None
    assert kernel.run(rows, None, values=False)["non_finite"] == want
    if not NO_COMPILER:
        need_kernels()
        (native_out, _), (fallback, _) = run_both(kernel, rows, values=False)
        assert native_out["non_finite"] == fallback["non_finite"] == want


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env={**os.environ, **env})


def test_cli_results_are_the_same_without_kernels(tmp_path):
    """rlvrx linearity weights and rlvrx extrapolate weights (bf16 and fp32 two-point) through the fallback
    (RLVRX_KERNELS=0): the same JSON summary and the same output bytes as with the kernels; one warning."""
    from safetensors.torch import save_file

    need_kernels()
    rng = np.random.default_rng(11)
    steps = [0, 10, 20, 30]
    base = {"a.weight": rng.normal(size=(64, 33)) * 0.02, "b.weight": rng.normal(size=(257,)) * 0.02}
    drift = {name: rng.normal(size=v.shape) * 1e-3 for name, v in base.items()}
    for dtype in ("bf16", "fp32"):
        dirs = []
        for s in steps:
            d = tmp_path / dtype / f"step_{s}"
            d.mkdir(parents=True)
            t = {n: torch.from_numpy(base[n] + s * drift[n] + rng.normal(size=base[n].shape) * 2e-4) for n in base}
            save_file({n: v.to(torch.bfloat16 if dtype == "bf16" else torch.float32) for n, v in t.items()}, str(d / "model.safetensors"))
            dirs.append(str(d))
        out_dir = tmp_path / dtype / "x"
        code = (
            "import json, os\n"
            "from rlvrx.io.reader import Checkpoint\n"
            "from rlvrx.extrapolate.weights import extrapolate_two_point\n"
            "from rlvrx.linearity.summary import summarize\n"
            "from rlvrx.linearity.weights import WeightSettings, analyze_weights\n"
            f"dirs = {dirs!r}\n"
            f"ckpts = [(s, Checkpoint(d)) for s, d in zip({steps!r}, dirs)]\n"
            "out = [summarize(analyze_weights(ckpts, WeightSettings(min_abs_change=1e-5, min_unique=3, threads=t))) for t in (1, 2)]\n"
            f"extrapolate_two_point(dirs[0], dirs[-1], 2.5, {str(out_dir)!r} + os.environ.get('RLVRX_KERNELS', '1'))\n"
            "print(json.dumps(out))\n"
        )
        with_kernels, without = run_python(code), run_python(code, RLVRX_KERNELS="0")
        assert with_kernels.returncode == 0 and without.returncode == 0, with_kernels.stderr + without.stderr
        assert "warning" not in with_kernels.stderr
        assert without.stderr.count("compiled kernels are off") == 1, without.stderr
        summaries = json.loads(with_kernels.stdout)
        assert json.loads(without.stdout) == summaries and summaries[0] == summaries[1]
        assert (tmp_path / dtype / "x1" / "model.safetensors").read_bytes() == (tmp_path / dtype / "x0" / "model.safetensors").read_bytes()


def test_no_compiler_install_has_no_extension():
    """Run by the no-compiler lane: the install succeeded without the extension, and rlvrx says so once."""
    if not NO_COMPILER:
        pytest.skip("the no-compiler lane's check (RLVRX_NO_COMPILER=1)")
    assert not BUILT
    proc = run_python("import rlvrx.kernels as native\nassert not native.available() and not native.available()\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("not built: no C compiler") == 1, proc.stderr
