"""`rlvrx linearity rank`: the top singular triplet and every diagnostic against numpy.linalg.svd, the
medians of --json, and --write-rank1 (AlphaRL's rank-1 model) as a checkpoint that loads for eval."""

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli
from safetensors.torch import load_file

from rlvrx.errors import UsageError
from rlvrx.io.reader import Checkpoint
from rlvrx.io.writer import save_state_dict
from rlvrx.linearity.rank import analyze_rank, public_json, top_singular_triplet, write_rank1
from rlvrx.trajectory import Trajectory

STEPS = [0, 10, 20, 40]


@pytest.mark.parametrize("shape, dtype", [((30, 20), torch.float64), ((5, 40), torch.float64), ((64, 48), torch.float32), ((3, 1), torch.float64)])
def test_top_triplet_matches_numpy_svd(shape, dtype):
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(shape, generator=g, dtype=torch.float64)
    u_np, s_np, vt_np = np.linalg.svd(delta.numpy())
    sigma, u, v, block = top_singular_triplet(delta.to(dtype))
    assert abs(sigma - s_np[0]) <= 1e-4 * s_np[0]
    assert abs(abs(float(u.double() @ torch.from_numpy(u_np[:, 0]))) - 1) < 1e-4
    assert abs(abs(float(v.double() @ torch.from_numpy(vt_np[0]))) - 1) < 1e-4
    # u and v belong together: sigma u v^T is the best rank-1 approximation
    assert np.allclose(sigma * np.outer(u.double(), v.double()), s_np[0] * np.outer(u_np[:, 0], vt_np[0]), atol=1e-4 * s_np[0])
    # warm start from the block gives the same answer
    assert abs(top_singular_triplet(delta.to(dtype), block)[0] - sigma) <= 1e-6 * sigma
    assert top_singular_triplet(torch.zeros(shape, dtype=dtype))[0] == 0.0
    with pytest.raises(UsageError, match="2-D"):
        top_singular_triplet(torch.zeros(4))


def synthetic_states():
    """A rank-1 update growing linearly (q), one that is rank-1 with noise (up), a full-rank random walk (down), a norm."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    base = {
        "model.layers.0.self_attn.q_proj.weight": rnd(12, 8),
        "model.layers.0.mlp.up_proj.weight": rnd(16, 8),
        "model.layers.1.mlp.down_proj.weight": rnd(8, 16),
        "model.norm.weight": 1 + rnd(8),
    }
    dirs = {k: torch.outer(rnd(v.shape[0]), rnd(v.shape[1])) * 1e-2 for k, v in base.items() if v.dim() == 2}
    states, walk = {}, torch.zeros(8, 16, dtype=torch.float64)
    for t in STEPS:
        walk = walk + (rnd(8, 16) * 1e-2 if t else 0)
        states[t] = {
            "model.layers.0.self_attn.q_proj.weight": base["model.layers.0.self_attn.q_proj.weight"] + t * dirs["model.layers.0.self_attn.q_proj.weight"],
            "model.layers.0.mlp.up_proj.weight": base["model.layers.0.mlp.up_proj.weight"]
            + (t + 0.01 * t**2) * dirs["model.layers.0.mlp.up_proj.weight"]
            + 3e-3 * rnd(16, 8) * (t > 0),
            "model.layers.1.mlp.down_proj.weight": base["model.layers.1.mlp.down_proj.weight"] + walk,
            "model.norm.weight": base["model.norm.weight"] + 1e-3 * t,
        }
    return states


def numpy_reference(states, name):
    deltas = [(states[t][name] - states[0][name]).numpy() for t in STEPS[1:]]
    svds = [np.linalg.svd(d) for d in deltas]
    energy = svds[-1][1][0] ** 2 / np.sum(deltas[-1] ** 2)
    u_stab = np.mean([abs(s[0][:, 0] @ svds[-1][0][:, 0]) for s in svds[:-1]])
    v_stab = np.mean([abs(s[2][0] @ svds[-1][2][0]) for s in svds[:-1]])
    sig = np.array([s[1][0] for s in svds])
    x = np.array(STEPS[1:], float)
    fit = np.polyval(np.polyfit(x, sig, 1), x)
    r2 = 1 - np.sum((sig - fit) ** 2) / np.sum((sig - sig.mean()) ** 2)
    return energy, u_stab, v_stab, r2


@pytest.fixture()
def run_dir(tmp_path):
    states = synthetic_states()
    run = tmp_path / "run"
    traj = Trajectory.load(run, create=True)
    for t in STEPS:
        path = save_state_dict(run / "checkpoints" / f"step_{t:06d}", {k: v.float() for k, v in states[t].items()})
        traj.add(t, path, kind="base" if t == 0 else "rl")
    traj.save()
    return run, {t: {k: v.float().double() for k, v in s.items()} for t, s in states.items()}


def test_diagnostics_match_numpy_svd(run_dir):
    run, states = run_dir
    summary = analyze_rank(Trajectory.load(run).checkpoints())
    assert summary["steps"] == STEPS[1:] and summary["base_step"] == 0 and summary["n_tensors"] == 3  # the norm is 1-D
    got = {t["name"]: t for t in summary["tensors"]}
    refs = {}
    for name in got:
        refs[name] = numpy_reference(states, name)
        for key, want in zip(("rank1_energy", "u_stability", "v_stability", "sigma1_r2"), refs[name]):
            assert abs(got[name][key] - want) < 1e-4, (name, key, got[name][key], want)
    q, down = got["model.layers.0.self_attn.q_proj.weight"], got["model.layers.1.mlp.down_proj.weight"]
    assert q["rank1_energy"] > 0.999999 and q["sigma1_r2"] > 0.999999  # an exactly rank-1, linear update
    assert down["rank1_energy"] < 0.6  # a full-rank random walk is not
    public = public_json(summary)
    for i, key in enumerate(("median_rank1_energy", "median_u_stability", "median_v_stability", "median_sigma1_r2")):
        assert abs(public[key] - statistics.median(r[i] for r in refs.values())) < 1e-4
    assert {g["module"] for g in public["by_module"]} == {"q", "up", "down"}
    assert [g["layer"] for g in public["by_layer"]] == [0, 1]


def test_cli_rank_json_tables_and_plot(run_dir, tmp_path):
    run, _ = run_dir
    code, out, err = run_cli("linearity", "rank", run, "--window", "0:40", "--json", tmp_path / "r.json")
    assert code == 0, out + err
    data = json.loads((tmp_path / "r.json").read_text())
    assert {"median_rank1_energy", "median_u_stability", "median_v_stability", "median_sigma1_r2"} <= set(data)
    assert "rank-1 energy" in out and "by layer" in out
    assert (run / "linearity" / "rank" / "rank1_energy.png").is_file() and (run / "linearity" / "rank" / "tensors.csv").is_file()
    for args, message in [
        (["--write-rank1", "20"], "--write-rank1 STEP needs --out DIR"),
        (["--write-rank1", "0", "--out", tmp_path / "m"], "not a checkpoint after the base step 0"),
        (["--window", "30:40"], "at least 3"),
    ]:
        code, out, err = run_cli("linearity", "rank", run, *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)


def test_write_rank1_is_alpharl_model_and_loads(tiny_model_dir, tmp_path):
    from rlvrx.models import load_pretrained

    base = load_file(str(tiny_model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    later = {k: v + 1e-2 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    current_dir = save_state_dict(tmp_path / "current", later, source_dir=tiny_model_dir)
    out = write_rank1(Checkpoint(tiny_model_dir), Checkpoint(current_dir), tmp_path / "rank1")
    got = load_file(str(out / "model.safetensors"))
    assert set(got) == set(later)
    n_matrices = 0
    for name, value in got.items():
        if value.dim() != 2:
            assert torch.equal(value, later[name])
            continue
        n_matrices += 1
        delta = (later[name].double() - base[name].double()).numpy()
        u, s, vt = np.linalg.svd(delta)
        want = base[name].double().numpy() + np.linalg.norm(delta) * np.outer(u[:, 0], vt[0])
        assert np.allclose(value.double().numpy(), want, rtol=0, atol=1e-5), name
        assert abs(np.linalg.norm(value.double().numpy() - base[name].double().numpy()) - np.linalg.norm(delta)) < 1e-4
    assert n_matrices >= 8
    model, tokenizer = load_pretrained(out)
    assert torch.allclose(model.model.layers[0].mlp.up_proj.weight.detach(), got["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(UsageError, match="already exists"):
        write_rank1(Checkpoint(tiny_model_dir), Checkpoint(current_dir), out)

    def interrupt(name, done, total):
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_rank1(Checkpoint(tiny_model_dir), Checkpoint(current_dir), tmp_path / "cut", progress=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "rank1"]


def test_cli_write_rank1(run_dir, tmp_path):
    run, states = run_dir
    code, out, err = run_cli("linearity", "rank", run, "--write-rank1", "40", "--out", tmp_path / "m")
    assert code == 0, out + err
    got = load_file(str(tmp_path / "m" / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"  # exactly rank-1: the model is the checkpoint itself
    assert torch.allclose(got[name].double(), states[40][name], atol=1e-5)
    assert torch.equal(got["model.norm.weight"].double(), states[40]["model.norm.weight"])
    assert Path(tmp_path / "m").is_dir()
