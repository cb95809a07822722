"""Weight linearity with the official definitions' options: bf16 cast on read, --tensors, --dump-params."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clirun import run_cli
from test_linearity_weights import STEPS, noisy_lines, numpy_r2, write_trajectory

import rlvrx.kernels as native
from rlvrx.errors import UsageError
from rlvrx.linearity.dump import dump_parameters
from rlvrx.linearity.kernel import Kernel, bf16_bits
from rlvrx.linearity.summary import summarize
from rlvrx.linearity.weights import WeightSettings, analyze_weights

BF16_SHAPES = {"model.layers.0.mlp.up_proj.weight": (24, 8), "model.layers.0.self_attn.q_proj.weight": (16, 8), "model.norm.weight": (8,)}


def slow_lines(seed: int) -> dict[str, np.ndarray]:
    """Values near 1 moving by ~1e-3 per step: bf16 (spacing 2^-7 there) merges many of them."""
    rng = np.random.default_rng(seed)
    t = np.asarray(STEPS, float)
    out = {}
    for name, shape in BF16_SHAPES.items():
        rate = rng.normal(size=shape) * 3e-4
        out[name] = 1.0 + rate * t.reshape(-1, *[1] * len(shape)) + rng.normal(size=(len(t), *shape)) * 2e-3
    return out


@pytest.fixture(scope="module")
def fp32_and_bf16(tmp_path_factory):
    series = slow_lines(3)
    fp32 = write_trajectory(tmp_path_factory.mktemp("fp32"), series, dtype=torch.float32)
    bf16 = write_trajectory(tmp_path_factory.mktemp("bf16"), series, dtype=torch.bfloat16)  # torch's own cast, saved
    return series, fp32, bf16


def test_bf16_bits_is_torch_cast():
    values = np.concatenate(
        [
            np.random.default_rng(0).normal(size=5000).astype(np.float32) * 3,
            np.array([0.0, -0.0, np.inf, -np.inf, 1 + 2**-8, 1 + 3 * 2**-8, 3.4e38], np.float32),
        ]
    )
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_bits(values), expected)
    assert bf16_bits(np.array([np.nan], np.float32))[0] == 0x7FC0


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "numpy"])
@pytest.mark.parametrize("sample", [None, 1.0])
def test_bf16_on_read_equals_a_bf16_copy(fp32_and_bf16, monkeypatch, kernels, sample):
    _, fp32, bf16 = fp32_and_bf16
    if not kernels:
        monkeypatch.setattr(native, "available", lambda: False)
    elif not native.available():
        pytest.skip("no compiled kernels in this install")
    cast = summarize(analyze_weights(fp32, WeightSettings(sample=sample, read_dtype="bfloat16", threads=1)))
    copy = summarize(analyze_weights(bf16, WeightSettings(sample=sample, threads=1)))
    stored = summarize(analyze_weights(fp32, WeightSettings(sample=sample, threads=1)))
    assert cast.pop("settings")["read_dtype"] == "bfloat16" and copy.pop("settings")["read_dtype"] is None
    stored.pop("settings")
    assert cast == copy
    # The cast matters here: more parameters filtered (fewer distinct values) than read as stored.
    assert cast["n_params"] < stored["n_params"]


def test_tensors_glob_restricts_the_analysis(tmp_path):
    ckpts = write_trajectory(tmp_path, noisy_lines(5))
    full = analyze_weights(ckpts, WeightSettings(threads=1))
    part = analyze_weights(ckpts, WeightSettings(threads=1, tensors=("model.layers.0.*", "lm_head.*")))
    names = sorted(t.name for t in part.tensors)
    assert names == sorted(
        [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.input_layernorm.weight",
            "lm_head.weight",
        ]
    )
    by_name = {t.name: t for t in full.tensors}
    for t in part.tensors:
        assert t.to_json() == by_name[t.name].to_json()
    assert part.settings["tensors"] == ["model.layers.0.*", "lm_head.*"]
    with pytest.raises(UsageError, match="tensors model.layers.9.* matches no floating-point tensor"):
        analyze_weights(ckpts, WeightSettings(tensors=("model.layers.9.*",)))


@pytest.mark.parametrize("read_dtype", [None, "bfloat16"])
def test_dump_matches_the_kernel_and_the_values(fp32_and_bf16, tmp_path, read_dtype):
    series, fp32, _ = fp32_and_bf16
    settings = WeightSettings(read_dtype=read_dtype, max_block_elements=50)  # several blocks per tensor
    out = tmp_path / "params.npz"
    names = dump_parameters(fp32, ["*proj.weight"], out, settings)
    assert names == ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    state = analyze_weights(fp32, WeightSettings(read_dtype=read_dtype, sample=1.0, threads=1))
    records = {t.name: t for t in state.tensors}
    dtype = torch.bfloat16 if read_dtype else torch.float32
    with np.load(out) as dump:
        assert dump["steps"].tolist() == STEPS
        assert dump["filter_codes"].tolist() == ["kept", "constant", "min_abs_change", "min_unique"]
        for name in names:
            values, r2, code = dump[f"{name}/values"], dump[f"{name}/r2"], dump[f"{name}/filter"]
            as_read = torch.from_numpy(series[name]).to(torch.float32).to(dtype).double().numpy().reshape(len(STEPS), -1)
            np.testing.assert_array_equal(values, as_read.T)
            # R² of the kept parameters: the kernel's values, bit for bit, in parameter order
            assert np.array_equal(r2[code == 0], records[name].values)
            assert np.isnan(r2[code != 0]).all()
            np.testing.assert_allclose(r2[code == 0], numpy_r2(as_read)[code == 0], rtol=0, atol=1e-12)
            assert [int((code == c).sum()) for c in (1, 2, 3)] == [records[name].filtered[k] for k in ("constant", "min_abs_change", "min_unique")]
            if native.available():  # the compiled kernel directly, on the raw rows as read
                raw = [bf16_bits(r) if read_dtype else r for r in series[name].reshape(len(STEPS), -1).astype(np.float32)]
                kernel = Kernel(STEPS, "BF16" if read_dtype else "F32", settings)
                assert kernel.entry is not None
                assert np.array_equal(kernel.run(raw, None, values=True)["values"], r2[code == 0])


def test_cli_read_dtype_tensors_and_dump(fp32_and_bf16, tmp_path):
    _, fp32, bf16 = fp32_and_bf16
    pairs = [a for step, c in fp32 for a in ("-c", f"{step}={c.path}")]
    code, out, err = run_cli(
        "linearity",
        "weights",
        *pairs,
        "--read-dtype",
        "bfloat16",
        "--tensors",
        "*proj.weight",
        "--dump-params",
        "*q_proj*",
        "--out",
        str(tmp_path / "w"),
        "--json",
        str(tmp_path / "w.json"),
        "--no-plots",
    )
    assert code == 0, out + err
    with np.load(tmp_path / "w" / "params.npz") as dump:
        assert sorted(dump.files) == [
            "filter_codes",
            "model.layers.0.self_attn.q_proj.weight/filter",
            "model.layers.0.self_attn.q_proj.weight/r2",
            "model.layers.0.self_attn.q_proj.weight/values",
            "steps",
        ]
    copy = [a for step, c in bf16 for a in ("-c", f"{step}={c.path}")]
    code, out, err = run_cli(
        "linearity", "weights", *copy, "--tensors", "*proj.weight", "--out", str(tmp_path / "b"), "--json", str(tmp_path / "b.json"), "--no-plots"
    )
    assert code == 0, out + err
    assert (tmp_path / "w.json").read_text() == (tmp_path / "b.json").read_text()
    code, out, err = run_cli("linearity", "weights", *pairs, "--read-dtype", "float16", "--out", str(tmp_path / "x"))
    assert code == 2 and "--read-dtype must be bfloat16" in err
    code, out, err = run_cli("linearity", "weights", *pairs, "--dump-params", "nope*", "--out", str(tmp_path / "x"))
    assert code == 2 and "--dump-params nope* matches no floating-point tensor" in err
