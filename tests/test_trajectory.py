"""rlvrx.trajectory: the trajectory.json manifest, scan/add, verify, and clear errors for bad manifests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from rlvrx.io.identity import checkpoint_sha256
from rlvrx.errors import CheckpointError, UsageError
from rlvrx.trajectory import MANIFEST, Trajectory, parse_step_paths


def weight_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


@pytest.fixture
def layouts(tmp_path, checkpoint_series, tiny_model_dir):
    """A run dir whose ckpts/ holds the three naming schemes, plus distractors; and a base model outside it."""
    root = tmp_path / "run" / "ckpts"
    paths = {}
    paths.update(checkpoint_series(root, [10], name="step_{step}"))
    paths.update(checkpoint_series(root, [20], name="global_step_{step}/actor/huggingface"))
    (root / "global_step_20" / "actor" / "model_world_size_1_rank_0.pt").write_bytes(b"fsdp shard")
    paths.update(checkpoint_series(root, [30], name="checkpoint-{step}"))
    (root / "step_x").mkdir()
    (root / "step_40").write_text("a file, not a dir")
    (root / "logs").mkdir()
    (root / "step_50").mkdir()  # no weights yet (e.g. being written): not registered
    return tmp_path / "run", root, paths


def test_scan_registers_all_layouts(layouts, tiny_model_dir):
    run, root, paths = layouts
    traj = Trajectory.load(run, create=True)
    base = traj.add(0, tiny_model_dir, kind="base")
    added = traj.scan(root)
    assert [e.step for e in added] == [10, 20, 30]
    assert traj.steps == [0, 10, 20, 30]
    assert [e.kind for e in traj] == ["base", "rl", "rl", "rl"]
    # inside the run dir: stored relative to it; outside: absolute
    assert [e.path for e in traj] == [
        str(tiny_model_dir.resolve()),
        "ckpts/step_10",
        "ckpts/global_step_20/actor/huggingface",
        "ckpts/checkpoint-30",
    ]
    for entry in traj:
        path = traj.resolve(entry)
        assert entry.sha256 == checkpoint_sha256(path) and entry.bytes == weight_bytes(path) > 0
    assert traj.path_of(20).resolve() == paths[20].resolve()
    assert base.step == 0 and traj.select(kinds=("rl",), window=(15, 30))[0].step == 20

    traj.save()
    saved = json.loads((run / MANIFEST).read_text())
    assert [e["step"] for e in saved] == [0, 10, 20, 30]
    assert set(saved[1]) == {"step", "path", "kind", "sha256", "bytes"}
    again = Trajectory.load(run)
    assert [e.to_json() for e in again] == [e.to_json() for e in traj]

    # scanning again (and re-adding the same base) changes nothing
    assert again.scan(root) == []
    assert again.add(0, tiny_model_dir, kind="base").sha256 == base.sha256
    assert again.steps == [0, 10, 20, 30]


def test_scan_without_hash(layouts):
    run, root, _ = layouts
    traj = Trajectory(run)
    traj.scan(root, hash=False)
    assert [e.sha256 for e in traj] == [None, None, None]
    assert traj.verify() == []


def test_scan_errors(tmp_path, checkpoint_series, tiny_model_dir):
    traj = Trajectory(tmp_path / "run")
    with pytest.raises(UsageError, match="no such directory to scan"):
        traj.scan(tmp_path / "nope")

    dup = tmp_path / "dup"
    checkpoint_series(dup, [5], name="step_{step}")
    checkpoint_series(dup, [5], name="checkpoint-{step}")
    with pytest.raises(UsageError, match=f"{dup}: more than one checkpoint for step 5"):
        traj.scan(dup)
    padded = tmp_path / "padded"
    checkpoint_series(padded, [7], name="step_{step}")
    checkpoint_series(padded, [7], name="step_{step:06d}")
    with pytest.raises(UsageError, match="more than one checkpoint for step 7"):
        traj.scan(padded)

    verl = tmp_path / "verl"
    (verl / "global_step_9" / "actor").mkdir(parents=True)
    (verl / "global_step_9" / "actor" / "model_world_size_1_rank_0.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"global_step_9: verl checkpoint without HF weights; run `rlvrx snapshot convert"):
        traj.scan(verl)

    # the scanned dir has its own step 0, the base is another model at step 0
    zero = tmp_path / "zero"
    checkpoint_series(zero, [0, 10])
    traj = Trajectory(tmp_path / "run2")
    traj.add(0, tiny_model_dir, kind="base")
    with pytest.raises(UsageError, match="step 0 is already in .*; pass replace=True"):
        traj.scan(zero)


def test_add_errors_and_replace(tmp_path, checkpoint_series):
    paths = checkpoint_series(tmp_path / "ck", [10, 20])
    traj = Trajectory(tmp_path / "run")
    with pytest.raises(UsageError, match="step -1 is negative"):
        traj.add(-1, paths[10])
    with pytest.raises(UsageError, match="kind 'final' is not one of base, rl, extrapolated"):
        traj.add(10, paths[10], kind="final")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        traj.add(10, tmp_path)
    traj.add(10, paths[10])
    with pytest.raises(UsageError, match=r"step 10 is already in .*ck/step_10\); pass replace=True"):
        traj.add(10, paths[20])
    entry = traj.add(10, paths[20], replace=True, grad_step=4, meta={"alpha": 2.0})
    assert traj.steps == [10] and entry.sha256 == checkpoint_sha256(paths[20])
    assert entry.to_json()["grad_step"] == 4 and entry.to_json()["meta"] == {"alpha": 2.0}
    with pytest.raises(UsageError, match=r"no checkpoint at step 3 \(steps: \[10\]\)"):
        traj.get(3)


def test_relative_path_resolved_against_run_dir(tmp_path, checkpoint_series, monkeypatch):
    run = tmp_path / "run"
    checkpoint_series(run / "checkpoints", [4])
    monkeypatch.chdir(tmp_path)
    traj = Trajectory(run)
    traj.add(4, "checkpoints/step_4")  # not under cwd, but under the run dir
    assert traj.entries[0].path == "checkpoints/step_4"
    traj.add(4, Path("run/checkpoints/step_4"), replace=True)  # relative to cwd
    assert traj.entries[0].path == "checkpoints/step_4"


# ---------------------------------------------------------------------------------------- manifests

GOOD = {"step": 0, "path": "a", "kind": "base"}
BAD_MANIFESTS = {
    "not json": ("[{", "invalid JSON at line 1"),
    "not a list": ('{"step": 1}', "expected a list of checkpoint entries"),
    "entry not an object": ("[1]", "entry 0: each entry must be an object"),
    "unsorted": (json.dumps([{"step": 20, "path": "b"}, {"step": 10, "path": "a"}]), r"steps are out of order \(\[20, 10\]\)"),
    "duplicate": (json.dumps([{"step": 10, "path": "a"}, {"step": 10, "path": "b"}]), "step 10 appears more than once"),
    "unknown kind": (json.dumps([{**GOOD, "kind": "final"}]), "entry 0: kind 'final' is not one of base, rl, extrapolated"),
    "negative step": (json.dumps([GOOD, {"step": -5, "path": "b"}]), "entry 1: step -5 is negative"),
    "string step": (json.dumps([{"step": "10", "path": "a"}]), "entry 0: step must be an integer, got '10'"),
    "bool step": (json.dumps([{"step": True, "path": "a"}]), "entry 0: step must be an integer, got True"),
    "no path": (json.dumps([{"step": 1}]), "entry 0: path must be a non-empty string"),
    "unknown field": (json.dumps([{**GOOD, "sha": "x"}]), r"entry 0: unknown field\(s\) sha"),
    "bad bytes": (json.dumps([{**GOOD, "bytes": "many"}]), "entry 0: bytes must be a non-negative integer, got 'many'"),
    "bad sha256": (json.dumps([{**GOOD, "sha256": 12}]), "entry 0: sha256 must be a hex string or null, got 12"),
    "bad grad_step": (json.dumps([{**GOOD, "grad_step": -1}]), "entry 0: grad_step must be a non-negative integer"),
    "bad meta": (json.dumps([{**GOOD, "meta": [1]}]), r"entry 0: meta must be an object, got \[1\]"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_invalid_manifest_is_a_clear_usage_error(tmp_path, case):
    text, message = BAD_MANIFESTS[case]
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(UsageError, match=message) as err:
        Trajectory.load(tmp_path)
    assert str(err.value).startswith(str(tmp_path / MANIFEST)) and "\n" not in str(err.value)


def test_manifest_forms_and_missing(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"checkpoints": [GOOD, {"step": 3, "path": "/abs/b", "kind": "extrapolated"}]}))
    traj = Trajectory.load(tmp_path)
    assert traj.steps == [0, 3] and traj.resolve(traj.entries[0]) == tmp_path / "a"
    assert traj.resolve(traj.entries[1]) == Path("/abs/b")
    with pytest.raises(UsageError, match="no such run directory"):
        Trajectory.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no trajectory manifest; create one with `rlvrx snapshot scan DIR --run"):
        Trajectory.load(tmp_path / "empty")
    assert Trajectory.load(tmp_path / "empty", create=True).entries == []


# ---------------------------------------------------------------------------------------- verify


@pytest.fixture
def registered(tmp_path, checkpoint_series):
    run = tmp_path / "run"
    paths = checkpoint_series(run / "checkpoints", [0, 10, 20, 30], name="step_{step:06d}")
    traj = Trajectory(run)
    traj.scan(run / "checkpoints")
    traj.save()
    return run, paths


def test_verify_passes_on_consistent_run(registered):
    run, _ = registered
    assert Trajectory.load(run).verify() == []


def test_verify_catches_changed_shape(registered, write_safetensors_checkpoint):
    run, paths = registered
    from safetensors.torch import load_file

    tensors = load_file(str(paths[20] / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(16)
    (paths[20] / "model.safetensors").unlink()
    write_safetensors_checkpoint(paths[20], tensors)
    base = run / "checkpoints" / "step_000000"
    shape_problem = f"step 20: tensor model.norm.weight has shape [32] in {base} but [16] in {paths[20]}"
    assert Trajectory.load(run).verify() == [
        f"step 20: {paths[20]} changed since it was registered (sha256 mismatch)",
        shape_problem,
    ]
    assert Trajectory.load(run).verify(hash=False) == [shape_problem]


def test_verify_catches_truncated_file_and_missing_dir(registered):
    run, paths = registered
    weights = paths[10] / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    os.rename(paths[30], paths[30].with_name("moved"))
    problems = Trajectory.load(run).verify()
    assert problems == [
        f"step 10: {weights}: corrupt or truncated safetensors file (tensor model.norm.weight lies outside the file or has the wrong size)",
        f"step 30: {paths[30]}: no such checkpoint directory",
    ]


def test_verify_catches_sha_mismatch_with_same_structure(registered):
    run, paths = registered
    weights = paths[30] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor's data: same header, different weights
    weights.write_bytes(bytes(data))
    assert Trajectory.load(run).verify() == [f"step 30: {paths[30]} changed since it was registered (sha256 mismatch)"]
    assert Trajectory.load(run).verify(hash=False) == []


def test_checkpoints_open_lazily_and_check_structure(registered, write_safetensors_checkpoint):
    run, paths = registered
    traj = Trajectory.load(run)
    opened = traj.checkpoints(traj.select(window=(10, 20)))
    assert [s for s, _ in opened] == [10, 20]
    write_safetensors_checkpoint(paths[20], {"x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="tensor model.embed_tokens.weight is in .* but not in"):
        traj.checkpoints()


# ---------------------------------------------------------------------------------------- STEP=PATH


def test_parse_step_paths(tmp_path):
    traj = parse_step_paths([f"100={tmp_path}/b", f"0={tmp_path}/a"])
    assert traj.steps == [0, 100] and traj.entries[1].path == str(tmp_path / "b")
    with pytest.raises(UsageError, match="expected STEP=PATH"):
        parse_step_paths(["abc"])
    with pytest.raises(UsageError, match="expected STEP=PATH"):
        parse_step_paths(["x=abc"])
    with pytest.raises(UsageError, match=r"duplicate steps in \['1=a', '1=b'\]"):
        parse_step_paths(iter(["1=a", "1=b"]))
    with pytest.raises(UsageError, match="steps must be non-negative"):
        parse_step_paths(["-1=a"])
