"""`rlvrx extrapolate weights`: exact formula, copies, sharding, least squares, atomicity, errors, CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli

from rlvrx.io.identity import checkpoint_sha256
from rlvrx.io.reader import INDEX_NAME, Checkpoint
from rlvrx.io.writer import save_state_dict
from rlvrx.errors import CheckpointError, RlvrxError, UsageError
from rlvrx.extrapolate import (
    PROVENANCE,
    Source,
    WeightsOptions,
    extrapolate_lstsq,
    extrapolate_two_point,
    is_copied,
    lstsq_coefficients,
    two_point_alpha,
)
from rlvrx.cli.args import parse_size, parse_window
from rlvrx.extrapolate.request import extrapolate_weights
from rlvrx.io.identity import input_fingerprint
from rlvrx.trajectory import Trajectory

ALPHAS = [-0.5, 0.5, 1.0, 2.0, 3.0]
NORMS = {"model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight", "model.norm.weight", "transformer.ln_f.weight"}
INTS = {"model.position_ids"}


def make_state(seed, dtype=torch.bfloat16, drift=None):
    """A small model-shaped state dict; `drift` (a state dict) is added with a small step, like training."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return torch.randn(shape, generator=g, dtype=torch.float64) * scale

    state = {
        "model.embed_tokens.weight": rnd(40, 16),
        "model.layers.0.input_layernorm.weight": 1 + rnd(16),
        "model.layers.0.self_attn.q_proj.weight": rnd(16, 16),
        "model.layers.0.self_attn.q_proj.bias": rnd(16),
        "model.layers.0.mlp.up_proj.weight": rnd(24, 16),
        "model.layers.1.post_attention_layernorm.weight": 1 + rnd(16),
        "model.layers.1.mlp.down_proj.weight": rnd(16, 24),
        "model.norm.weight": 1 + rnd(16),
        "transformer.ln_f.weight": 1 + rnd(16),
        "model.scale": rnd(),
        "lm_head.weight": rnd(40, 16),
    }
    if drift is not None:
        state = {k: drift[k].double() + v * 0.1 for k, v in state.items()}
    out = {k: v.to(dtype) for k, v in state.items()}
    out["model.position_ids"] = torch.arange(7, dtype=torch.int64) + seed
    return out


def save(path, state, shard=None, config=None):
    save_state_dict(path, state, max_shard_bytes=shard or (4 << 30))
    (Path(path) / "config.json").write_text(json.dumps(config or {"model_type": "qwen2", "from": str(path)}))
    return Path(path)


def load(path):
    with Checkpoint(path) as ckpt:
        return {name: ckpt.get(name).clone() for name in ckpt.names()}


def formula64(b, s, alpha):
    return b.double() + alpha * (s.double() - b.double())


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.fixture(scope="module")
def pair_bf16(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    base = make_state(0)
    second = make_state(1, drift=base)
    # Sharded inputs: several files with an index.
    return save(root / "base", base, shard=1500), save(root / "second", second, shard=1500, config={"model_type": "qwen2", "second": True}), base, second


# ------------------------------------------------------------------------------------ exact formula


@pytest.mark.parametrize("alpha, chunk", [(a, 1 << 22) for a in ALPHAS] + [(3.0, 7), (-0.5, 64)])
def test_two_point_equals_float64_formula_in_bf16(tmp_path, pair_bf16, alpha, chunk):
    base_dir, second_dir, base, second = pair_bf16
    assert (base_dir / INDEX_NAME).is_file() and len(list(base_dir.glob("*.safetensors"))) > 2
    out = tmp_path / "out"
    # chunk 7 / 64: every tensor streams through the ring of reused buffers in several uneven parts
    result = extrapolate_two_point(base_dir, second_dir, alpha, out, options=WeightsOptions(max_shard_bytes=1500, chunk_elements=chunk))
    assert (out / INDEX_NAME).is_file() and len(list(out.glob("*.safetensors"))) > 2  # sharded output
    got = load(out)
    assert list(got) == list(second)  # same names, same order
    for name, tensor in got.items():
        if name in NORMS or name in INTS:
            assert bits_equal(tensor, second[name]), name  # copied bit-identically from the second
        else:
            want = formula64(base[name], second[name], alpha).to(torch.bfloat16)
            assert tensor.dtype == torch.bfloat16
            assert torch.equal(tensor, want), (name, alpha, (tensor != want).sum())
    assert sorted(result.copied) == sorted(NORMS | INTS)
    assert len(result.extrapolated) == len(got) - len(NORMS | INTS)
    assert json.loads((out / "config.json").read_text())["second"] is True  # aux files from the latest


def test_extrapolation_really_moves_weights(tmp_path, pair_bf16):
    base_dir, second_dir, base, second = pair_bf16
    extrapolate_two_point(base_dir, second_dir, 3.0, tmp_path / "o")
    got = load(tmp_path / "o")["model.layers.0.mlp.up_proj.weight"].double()
    b, s = base["model.layers.0.mlp.up_proj.weight"].double(), second["model.layers.0.mlp.up_proj.weight"].double()
    # W_3 - W_s = 2 (W_s - W_b) up to bf16 rounding: far from both inputs.
    assert torch.allclose(got - s, 2 * (s - b), atol=2e-3)
    assert (got - s).abs().max() > 0.02


@pytest.mark.parametrize("alpha", [-0.5, 2.0, 3.0])
def test_float32_inputs_precise_is_exact_and_default_within_one_ulp(tmp_path, alpha):
    base = make_state(3, torch.float32)
    second = make_state(4, torch.float32, drift=base)
    b_dir, s_dir = save(tmp_path / "b", base), save(tmp_path / "s", second)
    extrapolate_two_point(b_dir, s_dir, alpha, tmp_path / "precise", options=WeightsOptions(precise=True))
    extrapolate_two_point(b_dir, s_dir, alpha, tmp_path / "fast")
    precise, fast = load(tmp_path / "precise"), load(tmp_path / "fast")
    differing = 0
    for name in base:
        if name in NORMS or name in INTS:
            continue
        want = formula64(base[name], second[name], alpha)
        assert torch.equal(precise[name], want.float()), name
        # float32 rounding of the difference and of the result: within an ulp of each.
        diff = (second[name].double() - base[name].double()).abs()
        bound = torch.finfo(torch.float32).eps * (want.abs() + (abs(alpha) + abs(1 - alpha)) * diff)
        assert ((fast[name].double() - want).abs() <= bound).all(), name
        differing += int((fast[name] != precise[name]).sum())
    assert differing > 0  # the default really is float32 arithmetic


def test_dtype_override_and_all(tmp_path, pair_bf16):
    base_dir, second_dir, base, second = pair_bf16
    out = tmp_path / "o"
    extrapolate_two_point(base_dir, second_dir, 2.0, out, options=WeightsOptions(dtype=torch.float32, extrapolate_all=True))
    got = load(out)
    for name, tensor in got.items():
        if name in INTS:
            assert bits_equal(tensor, second[name])
            continue
        assert tensor.dtype == torch.float32
        # bf16 inputs are exact in float32 and alpha=2 keeps the formula exact there.
        assert torch.equal(tensor, formula64(base[name], second[name], 2.0).float()), name


def test_fp16_inputs_use_float32_arithmetic(tmp_path):
    base = make_state(5, torch.float16)
    second = make_state(6, torch.float16, drift=base)
    b_dir, s_dir = save(tmp_path / "b", base), save(tmp_path / "s", second)
    extrapolate_two_point(b_dir, s_dir, 3.0, tmp_path / "o")
    got = load(tmp_path / "o")
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[name], formula64(base[name], second[name], 3.0).half())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compiled_lerp_is_torch_lerp_bit_for_bit(dtype):
    """The kernel behind bf16/fp32 two-point extrapolation against torch.lerp itself: ordinary values,
    zeros of both signs, subnormals, values near the maximum (overflow to inf), inf and nan; a
    length that leaves a vector tail; weights on both sides of torch's 0.5 switch. NaN payloads are
    not compared (torch's own differ between its vector and scalar code; a NaN never reaches a file)."""
    import rlvrx.kernels as native

    rng = np.random.default_rng(7)
    n = 4099
    finfo = torch.finfo(dtype)
    base = rng.normal(size=n) * 0.02
    second = base + rng.normal(size=n) * 2e-3
    special = [0.0, -0.0, finfo.tiny / 4, -finfo.tiny / 3, finfo.max * 0.9, -finfo.max * 0.7, math.inf, -math.inf, math.nan]
    base[: len(special)] = special
    second[: len(special)] = special[::-1]
    a = torch.from_numpy(base).to(dtype)
    b = torch.from_numpy(second).to(dtype)
    storage = np.uint16 if dtype == torch.bfloat16 else np.uint32
    bits = lambda t: t.view(torch.int16 if dtype == torch.bfloat16 else torch.int32).numpy().view(storage)
    for alpha in (3.0, 2.5, 1.7, 1.0, 0.5, 0.4999, 0.3, 0.0, -0.5, -2.25, 7.123456789):
        out = np.empty(n, dtype=storage)
        bad = native.library().rlvrx_lerp(native.RAW_KINDS[checkpoint_dtype_name(dtype)], bits(a).ctypes.data, bits(b).ctypes.data, alpha, out.ctypes.data, n)
        want = torch.lerp(a, b, alpha)
        nan = torch.isnan(want).numpy()
        np.testing.assert_array_equal(out[~nan], bits(want)[~nan], err_msg=f"alpha {alpha}")
        got_nan = torch.isnan(torch.from_numpy(out.view(np.int16 if dtype == torch.bfloat16 else np.int32)).view(dtype)).numpy()
        np.testing.assert_array_equal(got_nan, nan)
        assert bad == int((~torch.isfinite(want)).sum())


def checkpoint_dtype_name(dtype: torch.dtype) -> str:
    from rlvrx.io.dtypes import dtype_name

    return dtype_name(dtype)


def test_bf16_extrapolation_runs_without_torch(tmp_path, pair_bf16):
    """The default path (two-point, bf16) never imports torch: that import costs more than the work."""
    base_dir, second_dir, _, _ = pair_bf16
    code = (
        "import sys\n"
        "from rlvrx.extrapolate.weights import extrapolate_two_point\n"
        f"extrapolate_two_point({str(base_dir)!r}, {str(second_dir)!r}, 3.0, {str(tmp_path / 'o')!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    want = tmp_path / "with-torch"
    extrapolate_two_point(base_dir, second_dir, 3.0, want)
    got, expected = load(tmp_path / "o"), load(want)
    assert all(bits_equal(got[n], expected[n]) for n in expected)


def test_huge_finite_values_are_not_mistaken_for_overflow(tmp_path):
    # Every value is near the bf16 maximum: their sum overflows (the cheap finiteness check fails),
    # the exact check must still accept them; a real overflow is still refused.
    big = torch.full((64, 8), 3.0e38, dtype=torch.float64)
    base = {"w": big.to(torch.bfloat16)}
    second = {"w": (big * 1.05).to(torch.bfloat16)}
    b_dir, s_dir = save(tmp_path / "b", base), save(tmp_path / "s", second)
    extrapolate_two_point(b_dir, s_dir, 0.5, tmp_path / "o")
    assert torch.equal(load(tmp_path / "o")["w"], formula64(base["w"], second["w"], 0.5).to(torch.bfloat16))
    with pytest.raises(RlvrxError, match=r"tensor w: .*overflows BF16"):
        extrapolate_two_point(b_dir, s_dir, 3.0, tmp_path / "p")


def test_copy_patterns_are_configurable():
    assert is_copied("model.layers.3.input_layernorm.weight", torch.bfloat16, ("norm",))
    assert is_copied("h.0.ln_1.weight", torch.float32, ("norm", "ln_"))
    assert not is_copied("h.0.ln_1.weight", torch.float32, ("norm",))
    assert not is_copied("model.norm.weight", torch.float32, ("norm",), extrapolate_all=True)
    assert is_copied("model.position_ids", torch.int64, (), extrapolate_all=True)
    assert not is_copied("model.layers.0.mlp.up_proj.weight", torch.bfloat16, ("norm", "layernorm", "rmsnorm", "ln_"))


# ------------------------------------------------------------------------------------ least squares


def test_lstsq_coefficients_match_numpy_polyfit():
    steps, target = [0, 10, 20, 40, 70], 120
    rng = np.random.default_rng(0)
    ys = rng.normal(size=(len(steps), 5))
    coef = np.array(lstsq_coefficients(steps, target))
    fitted = np.array([np.polyval(np.polyfit(steps, ys[:, j], 1), target) for j in range(5)])
    assert np.allclose(coef @ ys, fitted, atol=1e-12)
    assert abs(sum(coef) - 1) < 1e-12
    # Two points: the line through them, i.e. the two-point alpha.
    assert np.allclose(lstsq_coefficients([10, 30], 70), [1 - two_point_alpha(10, 30, 70), two_point_alpha(10, 30, 70)])


def exact_line_states(steps, dtype=torch.float32):
    """W(t) = A + t B with A, B dyadic so every W(t) (and W(T), T <= 100) is exact in dtype."""
    g = torch.Generator().manual_seed(7)
    shapes = {"a.weight": (30, 8), "b.bias": (8,), "c.norm.weight": (8,)}
    # bfloat16 holds every integer up to 256 exactly: keep 16 * W(t) an integer of at most 8 bits there.
    a_max, b_max, b_den = (64, 64, 1024) if dtype == torch.float32 else (8, 2, 16)
    A = {k: torch.randint(-a_max, a_max + 1, s, generator=g).double() / 16 for k, s in shapes.items()}
    B = {k: torch.randint(-b_max, b_max + 1, s, generator=g).double() / b_den for k, s in shapes.items()}
    return A, B, {t: {k: (A[k] + t * B[k]).to(dtype) for k in shapes} for t in steps}


def test_lstsq_recovers_exact_line(tmp_path):
    steps, target = [0, 10, 20, 40], 100
    A, B, states = exact_line_states(steps)
    sources = [Source(save(tmp_path / f"s{t}", states[t], shard=400), t) for t in steps]
    # Unsorted input order on purpose: the latest (step 40) must still be the one copied from.
    res = extrapolate_lstsq(list(reversed(sources)), target, tmp_path / "precise", options=WeightsOptions(precise=True))
    extrapolate_lstsq(sources, target, tmp_path / "fast")
    precise, fast = load(tmp_path / "precise"), load(tmp_path / "fast")
    for name in ("a.weight", "b.bias"):
        want = (A[name] + target * B[name]).float()
        assert torch.equal(precise[name], want), name
        assert torch.allclose(fast[name], want, rtol=1e-6, atol=1e-6), name
    assert torch.equal(precise["c.norm.weight"], states[40]["c.norm.weight"])
    assert [i["step"] for i in res.inputs] == steps and res.method == "lstsq"


def test_lstsq_on_noisy_points_matches_per_parameter_polyfit(tmp_path):
    steps, target = [5, 15, 25, 35, 45], 90
    rng = np.random.default_rng(1)
    values = rng.normal(size=(len(steps), 12, 6))
    states = [{"w": torch.from_numpy(values[k]).float()} for k in range(len(steps))]
    sources = [Source(save(tmp_path / f"s{t}", st), t) for t, st in zip(steps, states)]
    extrapolate_lstsq(sources, target, tmp_path / "o", options=WeightsOptions(precise=True, chunk_elements=10))
    got = load(tmp_path / "o")["w"].double().numpy()
    vals32 = np.stack([s["w"].double().numpy() for s in states])
    want = np.empty((12, 6))
    for i in range(12):
        for j in range(6):
            want[i, j] = np.polyval(np.polyfit(steps, vals32[:, i, j], 1), target)
    assert np.allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.fixture()
def run_dir(tmp_path):
    """A run with a trajectory of bf16 checkpoints on an exact line at steps 0, 10, 20, 30."""
    run = tmp_path / "run"
    steps = [0, 10, 20, 30]
    A, B, states = exact_line_states(steps, torch.bfloat16)
    traj = Trajectory.load(run, create=True)
    for t in steps:
        path = save(run / "checkpoints" / f"step_{t:06d}", states[t])
        traj.add(t, path, kind="base" if t == 0 else "rl")
    traj.save()
    return run, states


def test_lstsq_window_from_run(run_dir):
    run, states = run_dir
    res = extrapolate_weights(run, fit="lstsq", window=parse_window("10:30"), target=60)
    assert res.out == run / "extrapolated" / "step_000060"
    assert [i["step"] for i in res.inputs] == [10, 20, 30]
    assert all(i["sha256_from"] == "manifest" for i in res.inputs)
    got = load(res.out)
    # The points lie exactly on a line (in bf16): its value at 60 is 2 W(30) - W(0), also exact in bf16.
    want = (2 * states[30]["a.weight"].double() - states[0]["a.weight"].double()).to(torch.bfloat16)
    assert want.abs().max() > 1 and torch.equal(got["a.weight"], want)
    assert torch.equal(got["c.norm.weight"], states[30]["c.norm.weight"])


# ------------------------------------------------------------------------------------ provenance, register


def test_provenance_and_hashes(tmp_path, pair_bf16):
    base_dir, second_dir, _, _ = pair_bf16
    out = tmp_path / "o"
    res = extrapolate_two_point(Source(base_dir, 10), Source(second_dir, 20), 2.0, out, target_step=30)
    prov = json.loads((out / PROVENANCE).read_text())
    assert prov["method"] == "two-point" and prov["alpha"] == 2.0 and prov["target_step"] == 30
    assert prov["coefficients"] == [-1.0, 2.0]
    assert [(i["role"], i["step"]) for i in prov["inputs"]] == [("base", 10), ("second", 20)]
    # By default: a fingerprint (sizes, headers, sampled blocks), no full sha256 (no second read of the inputs).
    for info, src in zip(prov["inputs"], (base_dir, second_dir)):
        assert info["sha256"] is None and info["sha256_from"] is None
        assert info["bytes"] == sum(p.stat().st_size for p in src.iterdir() if p.suffix == ".safetensors" or p.name == INDEX_NAME)
        assert info["fingerprint"] == input_fingerprint(src)["fingerprint"]
    assert prov["inputs"][0]["fingerprint"] != prov["inputs"][1]["fingerprint"]
    assert sorted(prov["copied"]) == sorted(NORMS | INTS)
    assert res.summary()["copied_tensors"] == len(NORMS | INTS)
    # hash_inputs (--hash): the full sha256 of every input byte, as the trajectory manifest records it.
    extrapolate_two_point(Source(base_dir, 10), Source(second_dir, 20), 2.0, tmp_path / "h", options=WeightsOptions(hash_inputs=True))
    prov = json.loads((tmp_path / "h" / PROVENANCE).read_text())
    assert prov["inputs"][0]["sha256"] == checkpoint_sha256(base_dir) and prov["inputs"][0]["sha256_from"] == "computed"
    assert prov["inputs"][1]["sha256"] == checkpoint_sha256(second_dir)


def test_fingerprint_sees_a_changed_value_in_a_sampled_block(tmp_path):
    state = {"w": torch.zeros(64, 1024, dtype=torch.float32)}  # 256 KiB of data: the 16 blocks cover 64 KiB of it
    a = save(tmp_path / "a", state)
    before = input_fingerprint(a)
    assert before["bytes"] == (a / "model.safetensors").stat().st_size
    changed = {"w": state["w"].clone()}
    changed["w"].view(-1)[-1] = 1.0  # the last 4 KiB block is always sampled
    b = save(tmp_path / "b", changed)
    assert input_fingerprint(b)["fingerprint"] != before["fingerprint"]
    c = save(tmp_path / "c", {"w": state["w"].clone()})  # same bytes elsewhere: same fingerprint
    assert input_fingerprint(c)["fingerprint"] == before["fingerprint"]
    reshaped = save(tmp_path / "d", {"w": state["w"].reshape(128, 512)})  # same values, another header
    assert input_fingerprint(reshaped)["fingerprint"] != before["fingerprint"]


def test_register_adds_extrapolated_entry(run_dir):
    run, states = run_dir
    res = extrapolate_weights(run, base=10, second=30, target=50, register=True)
    traj = Trajectory.load(run)
    entry = traj.get(50)
    assert entry.kind == "extrapolated" and traj.path_of(50).resolve() == res.out.resolve()
    assert entry.sha256 == checkpoint_sha256(res.out)
    assert entry.meta["alpha"] == 2.0 and entry.meta["from_steps"] == [10, 30]
    with pytest.raises(UsageError, match="already holds an extrapolated model"):
        extrapolate_weights(run, base=10, second=30, target=50, register=True, out=run / "other")
    extrapolate_weights(run, base=0, second=30, target=50, register=True, options=WeightsOptions(overwrite=True))
    assert Trajectory.load(run).get(50).meta["from_steps"] == [0, 30]
    # A real checkpoint is never replaced by an extrapolated one.
    with pytest.raises(UsageError, match="real checkpoint"):
        extrapolate_weights(run, base=0, second=10, target=30, register=True, out=run / "x")
    assert not (run / "x").exists()


# ------------------------------------------------------------------------------------ atomicity


def listing(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def test_failure_mid_stream_leaves_nothing_and_keeps_old_output(tmp_path, pair_bf16):
    base_dir, _, base, second = pair_bf16
    # A "corrupt" second checkpoint: a tensor late in the order holds inf.
    bad = dict(second)
    bad["lm_head.weight"] = bad["lm_head.weight"].clone()
    bad["lm_head.weight"][3, 4] = float("inf")
    bad_dir = save(tmp_path / "bad", bad, shard=1500)
    out = tmp_path / "o"
    written = []
    with pytest.raises(RlvrxError, match=r"lm_head.weight.*inf/nan.*bad"):
        extrapolate_two_point(base_dir, bad_dir, 2.0, out, options=WeightsOptions(max_shard_bytes=1500), progress=lambda n, d, t: written.append(n))
    assert len(written) > 3  # it failed mid-stream, after several tensors were written
    assert not out.exists() and listing(tmp_path) == ["bad"]  # no output, no temp dir left behind

    good = extrapolate_two_point(base_dir, pair_bf16[1], 2.0, out)
    before = checkpoint_sha256(out)
    with pytest.raises(RlvrxError):
        extrapolate_two_point(base_dir, bad_dir, 3.0, out, options=WeightsOptions(overwrite=True))
    assert checkpoint_sha256(out) == before and json.loads((out / PROVENANCE).read_text())["alpha"] == good.alpha
    assert listing(tmp_path) == ["bad", "o"]


def test_interrupt_leaves_nothing(tmp_path, pair_bf16):
    base_dir, second_dir, _, _ = pair_bf16

    def interrupt(name, done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extrapolate_two_point(base_dir, second_dir, 2.0, tmp_path / "o", progress=interrupt)
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------------ errors


def test_step_errors_and_warnings(run_dir, tmp_path):
    run, _ = run_dir
    with pytest.raises(UsageError, match="both step 10"):
        extrapolate_weights(run, base=10, second=10, target=40)
    with pytest.raises(UsageError, match="swap"):
        extrapolate_weights(run, base=20, second=10, target=40)
    with pytest.raises(UsageError, match="no checkpoint at step 15"):
        extrapolate_weights(run, base=0, second=15, target=40)
    with pytest.raises(UsageError, match="give target or alpha, not both"):
        extrapolate_weights(run, base=0, second=10, target=40, alpha=2.0)
    with pytest.raises(UsageError, match="at least 2"):
        extrapolate_weights(run, fit="lstsq", window=(25, 40), target=60)
    with pytest.raises(UsageError, match="^base is for the two-point"):
        extrapolate_weights(run, fit="lstsq", base=0, target=60)
    warnings = []
    res = extrapolate_weights(run, base=10, second=30, target=20, out=tmp_path / "i", warn=warnings.append)
    assert res.alpha == 0.5 and len(warnings) == 1 and "interpolates" in warnings[0]
    warnings.clear()
    extrapolate_weights(run, base=10, second=30, target=0, out=tmp_path / "back", warn=warnings.append)
    assert "backwards" in warnings[0]
    warnings.clear()
    extrapolate_weights(run, base=10, second=30, target=50, out=tmp_path / "fwd", warn=warnings.append)
    assert warnings == []


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda st: st.pop("model.layers.0.mlp.up_proj.weight"), "model.layers.0.mlp.up_proj.weight"),
        (
            lambda st: st.__setitem__("model.layers.1.mlp.down_proj.weight", torch.zeros(16, 25, dtype=torch.bfloat16)),
            r"model.layers.1.mlp.down_proj.weight has shape \[16, 2[45]\]",
        ),
        (lambda st: st.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(16)), r"model.layers.0.self_attn.q_proj.bias has dtype"),
    ],
)
def test_mismatched_inputs_name_the_tensor(tmp_path, pair_bf16, change, message):
    base_dir, _, base, second = pair_bf16
    other = dict(second)
    change(other)
    other_dir = save(tmp_path / "other", other)
    with pytest.raises(CheckpointError, match=message):
        extrapolate_two_point(base_dir, other_dir, 2.0, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_output_exists_and_output_is_input(tmp_path, pair_bf16):
    base_dir, second_dir, _, _ = pair_bf16
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UsageError, match="already exists; pass overwrite=True"):
        extrapolate_two_point(base_dir, second_dir, 2.0, out)
    assert listing(out) == ["keep.txt"]
    with pytest.raises(UsageError, match="is not a checkpoint directory; overwrite replaces only a model"):
        extrapolate_two_point(base_dir, second_dir, 2.0, out, options=WeightsOptions(overwrite=True))
    assert listing(out) == ["keep.txt"]
    (out / "keep.txt").unlink()  # an empty directory, or an earlier output, is replaced
    extrapolate_two_point(base_dir, second_dir, 2.0, out, options=WeightsOptions(overwrite=True))
    (out / "keep.txt").write_text("x")
    extrapolate_two_point(base_dir, second_dir, 3.0, out, options=WeightsOptions(overwrite=True))
    assert "keep.txt" not in listing(out) and PROVENANCE in listing(out)
    with pytest.raises(UsageError, match="is one of the input checkpoints"):
        extrapolate_two_point(base_dir, second_dir, 2.0, second_dir, options=WeightsOptions(overwrite=True))


def test_parsers():
    assert parse_window("100:400") == (100, 400) and parse_window("100:")[0] == 100 and parse_window(":5") == (0, 5)
    for bad in ("100", "a:b", "5:1"):
        with pytest.raises(UsageError):
            parse_window(bad)
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 << 30 and parse_size("1500") == 1500
    with pytest.raises(UsageError):
        parse_size("lots")


# ------------------------------------------------------------------------------------ CLI end to end


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from rlvrx.tiny import save_tiny_model

    run = tmp_path_factory.mktemp("tinyrun") / "run"
    traj = Trajectory.load(run, create=True)
    for step, seed in ((0, 0), (10, 1)):
        path = save_tiny_model(run / "checkpoints" / f"step_{step:06d}", seed=seed, layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
        traj.add(step, path)
    traj.save()
    return run


def test_cli_end_to_end_on_tiny_checkpoints(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = tmp_path / "summary.json"
    result_code, result_out, result_err = run_cli(
        "extrapolate", "weights", str(tiny_run), "--base", "0", "--second", "10", "--target", "30", "--register", "--json", str(summary)
    )
    assert result_code == 0, result_out + result_err
    assert "two-point" in result_out and "alpha" in result_out
    data = json.loads(summary.read_text())
    assert data["alpha"] == 3.0 and data["registered"] and data["copied_tensors"] == 5  # 2x2 layer norms + final norm
    out = tiny_run / "extrapolated" / "step_000030"
    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    m0 = AutoModelForCausalLM.from_pretrained(tiny_run / "checkpoints" / "step_000000")
    m1 = AutoModelForCausalLM.from_pretrained(tiny_run / "checkpoints" / "step_000010")
    w = lambda m: m.model.layers[1].mlp.gate_proj.weight.detach()
    assert torch.allclose(w(model), w(m0) + 3 * (w(m1) - w(m0)), rtol=0, atol=1e-6)
    assert torch.equal(model.model.norm.weight, m1.model.norm.weight)
    assert Trajectory.load(tiny_run).get(30).kind == "extrapolated"


def run_main(monkeypatch, args):
    """The installed entry point in-process: exit code as `rlvrx` would return it."""
    from rlvrx.cli import main

    monkeypatch.setattr(sys, "argv", ["rlvrx", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code or 0


def test_cli_paths_mode_and_exit_codes(tiny_run, tmp_path, monkeypatch, capsys):
    ckpts = tiny_run / "checkpoints"
    paths = ["--base-path", str(ckpts / "step_000000"), "--second-path", str(ckpts / "step_000010")]
    code = run_main(
        monkeypatch,
        ["extrapolate", "weights", *paths, "--alpha", "1.5", "--out", str(tmp_path / "o"), "--dtype", "bf16", "--no-hash", "--max-shard-size", "10KB"],
    )
    assert code == 0, capsys.readouterr().err
    assert Checkpoint(tmp_path / "o").dtypes() == {torch.bfloat16} and (tmp_path / "o" / INDEX_NAME).is_file()
    assert json.loads((tmp_path / "o" / PROVENANCE).read_text())["inputs"][0]["sha256"] is None
    assert run_main(monkeypatch, ["extrapolate", "weights", *paths, "--alpha", "1.5", "--out", str(tmp_path / "h"), "--hash"]) == 0
    assert json.loads((tmp_path / "h" / PROVENANCE).read_text())["inputs"][0]["sha256"] == checkpoint_sha256(ckpts / "step_000000")
    capsys.readouterr()
    assert run_main(monkeypatch, ["extrapolate", "weights", str(tiny_run), "--base", "10", "--second", "10", "--target", "30"]) == 2
    err = capsys.readouterr().err
    assert "both step 10" in err and "Traceback" not in err
    assert run_main(monkeypatch, ["extrapolate", "weights", *paths, "--alpha", "2", "--out", str(tmp_path / "o")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_main(monkeypatch, ["extrapolate", "weights", *paths, "--out", str(tmp_path / "p")]) == 2
    assert "need --alpha" in capsys.readouterr().err
