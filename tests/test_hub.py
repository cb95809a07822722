"""Hub model ids (org/name[@revision]) resolve to the local Hugging Face cache; offline and not cached is one line."""

import json
import shutil

import pytest
from clirun import run_cli

from rlvrx.errors import UsageError
from rlvrx.hub import model_dir, parse_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_model_dir):
    """HF_HOME with the tiny model cached as org/tiny (refs/main -> COMMIT), the hub offline."""
    home = tmp_path / "hf"
    repo = home / "hub" / "models--org--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return repo / "snapshots" / COMMIT


def test_parse_hub_id():
    assert parse_hub_id("Qwen/Qwen2.5-0.5B") == ("Qwen/Qwen2.5-0.5B", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id(f"org/name@{COMMIT}") == ("org/name", COMMIT)
    for not_an_id in ("name", "a/b/c", "/abs/path", "./x/y", "../x", "runs/a:200", "org/name@", "org/..", "org/name@rev with space"):
        assert parse_hub_id(not_an_id) is None, not_an_id


def test_model_dir_resolves_branch_and_commit_from_the_cache(hub_cache):
    assert model_dir("org/tiny") == hub_cache
    assert model_dir(f"org/tiny@{COMMIT}") == hub_cache
    assert model_dir("org/tiny@main") == hub_cache


def test_local_paths_win_and_are_returned_unchanged(hub_cache, tmp_path, monkeypatch):
    local = tmp_path / "org" / "tiny"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert model_dir("org/tiny") == local.relative_to(tmp_path)  # the directory ./org/tiny, not the hub model
    assert model_dir(tmp_path / "missing") == tmp_path / "missing"  # not an id: the caller reports it


def test_offline_and_not_cached_is_one_line(hub_cache):
    with pytest.raises(UsageError) as info:
        model_dir("org/absent")
    message = str(info.value)
    assert "\n" not in message and "org/absent" in message and "HF_HUB_OFFLINE is set" in message
    assert str(hub_cache.parents[2]) in message  # the cache it looked in
    with pytest.raises(UsageError, match="not in the cache"):
        model_dir("org/tiny@v2")  # cached repo, uncached revision


def test_eval_hub_id_from_the_cache_matches_eval_of_the_directory(hub_cache, tiny_model_dir, tmp_path):
    common = ("--task", "arithmetic", "--limit", "4", "-n", "2", "--seed", "3", "--no-progress")
    code, out, err = run_cli("eval", "org/tiny", *common, "--out", tmp_path / "hub", "--json", tmp_path / "hub.json")
    assert code == 0, out + err
    code, out, err = run_cli("eval", tiny_model_dir, *common, "--out", tmp_path / "dir", "--json", tmp_path / "dir.json")
    assert code == 0, out + err
    by_hub, by_dir = json.loads((tmp_path / "hub.json").read_text()), json.loads((tmp_path / "dir.json").read_text())
    assert list(by_hub) == ["org/tiny"]
    assert by_hub["org/tiny"]["arithmetic"] == by_dir[tiny_model_dir.name]["arithmetic"]
    rows = [json.loads(line) for line in (tmp_path / "hub" / "org-tiny" / "arithmetic.jsonl").read_text().splitlines()]
    assert len(rows) == 4


def test_eval_hub_id_not_cached_fails_in_one_line(hub_cache, tmp_path):
    code, out, err = run_cli("eval", "org/absent", "--task", "arithmetic", "--limit", "2", "--out", tmp_path / "e")
    assert code == 2
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1 and "org/absent" in lines[0] and "HF_HUB_OFFLINE is set" in lines[0], lines
    assert not (tmp_path / "e").exists()


def test_hub_id_as_the_base_of_a_trajectory(hub_cache, tmp_path, checkpoint_series):
    from rlvrx.trajectory import Trajectory, parse_step_paths

    series = checkpoint_series(tmp_path / "ckpts", [10, 20])
    pairs = parse_step_paths(["0=org/tiny", f"10={series[10]}", f"20={series[20]}"])
    assert [pairs.resolve(e) for e in pairs] == [hub_cache.resolve(), series[10].resolve(), series[20].resolve()]
    traj = Trajectory.load(tmp_path / "run", create=True)
    entry = traj.add(0, "org/tiny", kind="base", hash=False)
    assert traj.resolve(entry).resolve() == hub_cache.resolve()
    with pytest.raises(UsageError, match="org/absent.*HF_HUB_OFFLINE is set"):
        parse_step_paths(["0=org/absent", f"10={series[10]}"])


def test_extrapolate_weights_from_a_hub_base(hub_cache, tmp_path, checkpoint_series):
    """W = W_base + alpha (W_second - W_base) with the base named by hub id, against numpy in float64."""
    import numpy as np
    from safetensors.numpy import load_file

    series = checkpoint_series(tmp_path / "ckpts", [10])
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("extrapolate", "weights", "--base-path", "org/tiny", "--second-path", series[10], "--alpha", "2", "--out", out)
    assert code == 0, stdout + stderr
    base, second, got = (load_file(str(d / "model.safetensors")) for d in (hub_cache, series[10], out))
    assert set(got) == set(base)
    moved = 0
    for name, value in got.items():
        expected = base[name].astype(np.float64) + 2 * (second[name].astype(np.float64) - base[name].astype(np.float64))
        if "norm" in name:  # norm weights are copied from the later checkpoint (the documented default)
            expected = second[name]
        if not np.array_equal(second[name], base[name]):
            moved += 1
        np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6)
    assert moved > 0
