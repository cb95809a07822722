"""`rlvrx extrapolate weights --fit rank1` (RELEX's temporal rank-1 fit): the numerics against a numpy SVD
reference, exact recovery of a rank-1-in-time trajectory, window of one == two-point (bit for bit),
provenance, atomicity, the CLI and its errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli

from rlvrx.errors import RlvrxError, UsageError
from rlvrx.extrapolate import PROVENANCE, Source, WeightsOptions, extrapolate_two_point
from rlvrx.extrapolate import extrapolate_rank1
from rlvrx.formulas import gram_top_components, ols_line, rank1_coefficients
from rlvrx.io.reader import Checkpoint
from rlvrx.io.writer import save_state_dict
from rlvrx.trajectory import Trajectory

SHAPES = {"a.weight": (12, 6), "b.bias": (5,), "c.norm.weight": (6,), "d.weight": (3, 4, 2)}


def numpy_rank_r(base, rows, steps, base_step, target, rank):
    """The issue's recipe with numpy.linalg.svd: M[t] = theta_t - theta_B, c_t = sigma u[t], polyfit(c_t, t), theta_B + sum (a + b T) v."""
    m = np.stack([r.ravel() - base.ravel() for r in rows])
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    out = base.ravel().astype(np.float64).copy()
    ev, r2 = [], []
    for r in range(rank):
        c = s[r] * u[:, r]
        b, a = np.polyfit(np.array(steps, float) - base_step, c, 1)
        out += (a + b * (target - base_step)) * vt[r]
        fit = a + b * (np.array(steps, float) - base_step)
        r2.append(1 - np.sum((c - fit) ** 2) / np.sum((c - c.mean()) ** 2))
        ev.append(s[r] ** 2 / np.sum(s**2))
    return out.reshape(base.shape), ev, r2


def save(path, state):
    save_state_dict(path, state)
    (Path(path) / "config.json").write_text('{"model_type": "qwen2"}')
    return Path(path)


def trajectory(root, steps, noise, dtype=torch.float32, seed=0, rank=1):
    """theta_t = theta_0 + sum_r (a_r + b_r t) V_r + noise * N_t for each tensor (float64, then cast)."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}
    dirs = {k: [torch.randn(s, generator=g, dtype=torch.float64) * 1e-2 for _ in range(rank)] for k, s in SHAPES.items()}
    lines = [(0.5 + r, 0.2 / (r + 1)) for r in range(rank)]
    states = {}
    for t in steps:
        states[t] = {
            k: (base[k] + sum((a + b * t) * d for (a, b), d in zip(lines, dirs[k])) + noise * torch.randn(base[k].shape, generator=g, dtype=torch.float64)).to(
                dtype
            )
            for k in SHAPES
        }
    states[0] = {k: v.to(dtype) for k, v in base.items()}
    paths = {t: save(root / f"step_{t}", states[t]) for t in [0, *steps]}
    exact = lambda T: {k: base[k] + sum((a + b * T) * d for (a, b), d in zip(lines, dirs[k])) for k in SHAPES}  # noqa: E731
    return paths, states, exact


def load(path):
    with Checkpoint(path) as ckpt:
        return {name: ckpt.get(name).clone() for name in ckpt.names()}


def test_formulas_match_numpy_svd_and_polyfit():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(5, 40))
    steps = [3.0, 7.0, 8.0, 15.0, 30.0]
    sigmas, vectors = gram_top_components(m @ m.T, 3)
    _, s, _ = np.linalg.svd(m, full_matrices=False)
    assert np.allclose(sigmas, s[:3], rtol=1e-12)
    for r in range(2):
        w, stats = rank1_coefficients(m @ m.T, steps, 50.0, rank=r + 1)
        want, ev, r2 = numpy_rank_r(np.zeros(40), list(m), steps, 0.0, 50.0, r + 1)
        assert np.allclose(np.array(w) @ m, want, rtol=1e-10, atol=1e-12)
        assert np.allclose([x["explained_variance"] for x in stats], ev) and np.allclose([x["r2"] for x in stats], r2)
    a, b, r2 = ols_line([1, 2, 4], [3, 5, 9])
    assert (a, b, r2) == (1.0, 2.0, 1.0)
    assert ols_line([1, 2], [4, 4])[2] == 1.0
    # a tensor that did not move: no direction, the base comes back
    w, stats = rank1_coefficients(np.zeros((3, 3)), [1, 2, 3], 9)
    assert w == [0.0, 0.0, 0.0] and stats[0]["explained_variance"] is None
    with pytest.raises(UsageError, match="rank must be between 1 and the number of rows"):
        gram_top_components(np.eye(2), 3)


@pytest.mark.parametrize("chunk", [1 << 22, 7])
def test_exact_recovery_of_a_rank1_trajectory_uneven_steps(tmp_path, chunk):
    steps = [10, 20, 50, 60]
    paths, _, exact = trajectory(tmp_path, steps, noise=0.0, dtype=torch.float64)
    res = extrapolate_rank1(Source(paths[0], 0), [Source(paths[t], t) for t in steps], 200, tmp_path / "o", options=WeightsOptions(chunk_elements=chunk))
    got, want = load(res.out), exact(200)
    for k in SHAPES:
        if "norm" in k:
            continue
        assert (want[k] - got[k]).abs().max() < 1e-12 * want[k].abs().max()
    assert res.copied == ["c.norm.weight"] and torch.equal(got["c.norm.weight"], load(paths[60])["c.norm.weight"])
    prov = json.loads((res.out / PROVENANCE).read_text())
    assert prov["method"] == "rank1" and prov["rank"] == 1 and set(prov["tensors"]) == {"a.weight", "b.bias", "d.weight"}
    assert abs(prov["median_explained_variance"] - 1) < 1e-12 and abs(prov["median_r2"] - 1) < 1e-12
    assert [i["step"] for i in prov["inputs"]] == [0, *steps]


def test_noisy_trajectory_matches_numpy_reference_and_beats_noise(tmp_path):
    steps = [10, 20, 30, 45, 50]
    paths, states, exact = trajectory(tmp_path, steps, noise=1e-4)
    res = extrapolate_rank1(
        Source(paths[0], 0), [Source(paths[t], t) for t in steps], 100, tmp_path / "o", options=WeightsOptions(precise=True, chunk_elements=5)
    )
    got = load(res.out)
    prov = json.loads((res.out / PROVENANCE).read_text())
    for k in ("a.weight", "d.weight"):
        want, ev, r2 = numpy_rank_r(states[0][k].double().numpy(), [states[t][k].double().numpy() for t in steps], steps, 0, 100, 1)
        assert np.allclose(got[k].double().numpy(), want, rtol=0, atol=2e-6)  # float32 output of the float64 result
        assert np.isclose(prov["tensors"][k]["explained_variance"][0], ev[0], rtol=1e-9)
        assert np.isclose(prov["tensors"][k]["r2"][0], r2[0], rtol=1e-9)
        # the fit averages the noise away: closer to the true line at 100 than the noise of one checkpoint
        assert (got[k].double() - exact(100)[k]).abs().max() < 3e-4 < (exact(100)[k] - exact(0)[k]).abs().max()


def test_rank2_recovers_a_rank2_trajectory_that_rank1_misses(tmp_path):
    steps = [10, 20, 30, 40]
    paths, _, exact = trajectory(tmp_path, steps, noise=0.0, dtype=torch.float64, rank=2)
    window = [Source(paths[t], t) for t in steps]
    two = load(extrapolate_rank1(Source(paths[0], 0), window, 90, tmp_path / "r2", rank=2).out)
    one = load(extrapolate_rank1(Source(paths[0], 0), window, 90, tmp_path / "r1", rank=1).out)
    err = lambda got: (got["a.weight"] - exact(90)["a.weight"]).abs().max()  # noqa: E731
    assert err(two) < 1e-12 < 1e-4 < err(one)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_window_of_one_is_two_point_bit_for_bit(tmp_path, dtype):
    paths, _, _ = trajectory(tmp_path, [20], noise=1e-3, dtype=dtype)
    rank1 = extrapolate_rank1(Source(paths[0], 0), [Source(paths[20], 20)], 70, tmp_path / "r")
    two = extrapolate_two_point(Source(paths[0], 0), Source(paths[20], 20), 3.5, tmp_path / "t", target_step=70)
    a, b = load(rank1.out), load(two.out)
    assert all(
        torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.bfloat16 else a[k], b[k].view(torch.uint8) if b[k].dtype == torch.bfloat16 else b[k])
        for k in SHAPES
    )
    assert not torch.equal(a["a.weight"], load(paths[20])["a.weight"])
    assert rank1.alpha == 3.5 and rank1.tensor_fits["a.weight"]["weights"] == [3.5]


def test_interrupt_leaves_nothing(tmp_path):
    paths, _, _ = trajectory(tmp_path / "in", [10, 20, 30], noise=1e-3)

    def interrupt(name, done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extrapolate_rank1(Source(paths[0], 0), [Source(paths[t], t) for t in (10, 20, 30)], 60, tmp_path / "out", progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_non_finite_input_names_the_tensor_and_leaves_nothing(tmp_path):
    paths, states, _ = trajectory(tmp_path / "in", [10, 20], noise=1e-3)
    bad = dict(states[20])
    bad["d.weight"] = bad["d.weight"].clone()
    bad["d.weight"][1, 2, 0] = float("nan")
    save(tmp_path / "in" / "bad", bad)
    with pytest.raises(RlvrxError, match="tensor d.weight: its drifts hold inf/nan"):
        extrapolate_rank1(Source(paths[0], 0), [Source(paths[10], 10), Source(tmp_path / "in" / "bad", 20)], 60, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


@pytest.fixture()
def run_dir(tmp_path):
    run = tmp_path / "run"
    paths, _, exact = trajectory(tmp_path / "src", [10, 20, 30], noise=0.0, dtype=torch.float64)
    traj = Trajectory.load(run, create=True)
    for t, p in paths.items():
        traj.add(t, p, kind="base" if t == 0 else "rl")
    traj.save()
    return run, exact


def test_cli_rank1_and_errors(run_dir, tmp_path):
    run, exact = run_dir
    summary = tmp_path / "s.json"
    code, out, err = run_cli(
        "extrapolate", "weights", run, "--fit", "rank1", "--base", "0", "--window", "0:30", "--target", "60", "--json", summary, "--register"
    )
    assert code == 0, out + err
    assert "rank1" in out and "median explained var." in out
    data = json.loads(summary.read_text())
    assert [i["step"] for i in data["inputs"]] == [0, 10, 20, 30] and data["registered"]  # the base is not a window row
    assert abs(data["median_r2"] - 1) < 1e-9
    got = load(run / "extrapolated" / "step_000060")
    assert (got["a.weight"] - exact(60)["a.weight"]).abs().max() < 1e-12
    assert Trajectory.load(run).get(60).kind == "extrapolated"

    for args, message in [
        (["--window", "10:30", "--target", "60", "--rank", "4"], "--rank 4: must be between 1 and the number of window checkpoints (3)"),
        (["--window", "10:30", "--target", "60", "--second", "20"], "--second is not used by --fit rank1"),
        (["--window", "40:50", "--target", "60"], "needs at least 1 base/rl checkpoints"),
        (["--window", "10:30"], "--fit rank1 needs RUN, --base B"),
    ]:
        code, out, err = run_cli("extrapolate", "weights", run, "--fit", "rank1", "--base", "0", *args, "--out", tmp_path / "x")
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
    code, _, err = run_cli("extrapolate", "weights", run, "--fit", "lstsq", "--window", "10:30", "--target", "60", "--rank", "2", "--out", tmp_path / "x")
    assert code == 2 and "--rank 2 is for --fit rank1" in err
    assert not (tmp_path / "x").exists()
