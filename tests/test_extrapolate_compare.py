"""`rlvrx extrapolate compare`: every predictor's weight error against references computed with numpy from
the checkpoints' values, and the eval column on a tiny model."""

import json

import numpy as np
import torch
from clirun import run_cli

from rlvrx.io.writer import save_state_dict
from rlvrx.trajectory import Trajectory

STEPS = [0, 10, 20, 30, 40, 60]


def curved_run(tmp_path):
    """2-D and 1-D tensors moving along (t + 0.004 t^2) D + a second direction, full rank: no predictor is exact."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.layers.0.mlp.up_proj.weight": (12, 8), "model.layers.0.self_attn.q_proj.bias": (8,), "model.norm.weight": (8,)}
    base = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    d1 = {k: torch.randn(s, generator=g, dtype=torch.float64) * 1e-2 for k, s in shapes.items()}
    d2 = {k: torch.randn(s, generator=g, dtype=torch.float64) * 1e-3 for k, s in shapes.items()}
    run = tmp_path / "run"
    traj = Trajectory.load(run, create=True)
    states = {}
    for t in STEPS:
        states[t] = {k: (base[k] + (t + 0.004 * t * t) * d1[k] + np.sin(t / 9) * d2[k]) for k in shapes}
        traj.add(t, save_state_dict(run / "checkpoints" / f"step_{t:06d}", states[t]), kind="base" if t == 0 else "rl")
    traj.save()
    return run, states


def reference(states, window, target):
    """Each predictor from the issue's formulas with numpy, on float64 values; norms from the window's end."""
    first, end = window[0], window[-1]
    alpha = (target - first) / (end - first)
    preds = {name: {} for name in ("two-point", "lstsq", "rank1", "alpharl")}
    for k in states[first]:
        w = {t: states[t][k].numpy() for t in window}
        if "norm" in k:
            for p in preds.values():
                p[k] = w[end]
            continue
        preds["two-point"][k] = w[first] + alpha * (w[end] - w[first])
        stack = np.stack([w[t].ravel() for t in window])
        coef = np.polyfit(np.array(window, float), stack, 1)
        preds["lstsq"][k] = (coef[0] * target + coef[1]).reshape(w[first].shape)
        m = np.stack([w[t].ravel() - w[first].ravel() for t in window[1:]])
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        b, a = np.polyfit(np.array(window[1:], float) - first, s[0] * u[:, 0], 1)
        preds["rank1"][k] = w[first] + ((a + b * (target - first)) * vt[0]).reshape(w[first].shape)
        delta = w[end] - w[first]
        if delta.ndim == 2:
            uu, ss, vv = np.linalg.svd(delta)
            preds["alpharl"][k] = w[first] + alpha * np.linalg.norm(delta) * np.outer(uu[:, 0], vv[0])
        else:
            preds["alpharl"][k] = preds["two-point"][k]
    real = {k: v.numpy() for k, v in states[target].items()}
    drift = np.sqrt(sum(np.sum((real[k] - states[end][k].numpy()) ** 2) for k in real))
    return {name: np.sqrt(sum(np.sum((p[k] - real[k]) ** 2) for k in real)) / drift for name, p in preds.items()}


def test_weight_errors_match_numpy_reference(tmp_path):
    run, states = curved_run(tmp_path)
    code, out, err = run_cli("extrapolate", "compare", run, "--target", "60", "--window", "0:40", "--json", tmp_path / "c.json")
    assert code == 0, out + err
    data = json.loads((tmp_path / "c.json").read_text())
    want = reference(states, [0, 10, 20, 30, 40], 60)
    got = {name: row["relative"] for name, row in data["predictors"].items()}
    assert set(got) == set(want)
    for name in want:
        assert abs(got[name] - want[name]) < 1e-9 * max(1, want[name]), (name, got[name], want[name])
    assert len({round(v, 6) for v in want.values()}) == 4 and all(v > 0.01 for v in want.values())  # four different answers
    assert "weight error / drift" in out and "alpharl" in out
    # the window excludes the target; the predictions stay on disk
    assert data["window_steps"] == [0, 10, 20, 30, 40] and (run / "extrapolated" / "compare-t60-w0-40" / "rank1").is_dir()
    code, _, err = run_cli("extrapolate", "compare", run, "--target", "60", "--window", "0:40")
    assert code == 2 and "--overwrite" in err
    for args, message in [
        (["--target", "50"], "--target 50: the shoot-out predicts a real checkpoint"),
        (["--target", "10", "--window", "0:40"], "needs at least 2 base/rl checkpoints before the target 10"),
    ]:
        code, _, err = run_cli("extrapolate", "compare", run, *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)


def test_eval_column_on_a_linear_tiny_run(tmp_path, checkpoint_series):
    paths = checkpoint_series(tmp_path / "ckpts", [0, 10, 20, 30])
    run = tmp_path / "run"
    traj = Trajectory.load(run, create=True)
    for step, path in paths.items():
        traj.add(step, path, kind="base" if step == 0 else "rl")
    traj.save()
    code, out, err = run_cli(
        "extrapolate",
        "compare",
        run,
        "--target",
        "30",
        "--window",
        "0:20",
        "--task",
        "arithmetic",
        "--task-option",
        "digits=1",
        "--task-option",
        "n_train=40",
        "--task-option",
        "n_test=10",
        "--limit",
        "2",
        "--samples",
        "1",
        "--device",
        "cpu",
        "--json",
        tmp_path / "c.json",
    )
    assert code == 0, out + err
    data = json.loads((tmp_path / "c.json").read_text())
    rel = {name: row["relative"] for name, row in data["predictors"].items()}
    # an exactly linear trajectory: the temporal predictors agree (what remains is the norms, copied from the window's end);
    # the rank-1 update of full-rank random drifts misses more
    assert abs(rel["lstsq"] - rel["two-point"]) < 1e-6 and abs(rel["rank1"] - rel["two-point"]) < 1e-6
    assert rel["two-point"] + 0.5 < rel["alpharl"]
    assert set(data["accuracy"]) == {"real", "window-end", "two-point", "lstsq", "rank1", "alpharl"}
    assert all(0 <= m["avg"] <= 1 and m["problems"] == 2 for m in data["accuracy"].values())
    assert "arithmetic avg" in out
