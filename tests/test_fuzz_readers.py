"""Random damage (truncation, byte flips, random bytes, invalid UTF-8, huge nesting) thrown at the
readers of checkpoints (safetensors header, shard index), trajectory.json, recipes and metrics.jsonl,
through the real CLI entry point, with a fixed seed and a bounded count.

Every failure must be an exit code 1 or 2 with a one-line error and no traceback, and must write
nothing. A damaged file that is still valid may be accepted, but only where an independent reader
accepts it too (safetensors itself for weight files; `json`/`yaml` for the others).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from clirun import run_cli
import torch
import yaml
from safetensors import safe_open

SEED = int(os.environ.get("RLVRX_FUZZ_SEED", "17"))  # another seed explores other damage
CASES = 24  # per reader


def one_line(err: str) -> bool:
    return err.strip() != "" and "\n" not in err.strip() and "Traceback" not in err


@pytest.fixture
def cli():
    return run_cli


def damage(data: bytes, rng: random.Random, region: int | None = None) -> tuple[str, bytes]:
    """One random kind of damage; `region` limits flips and cuts to the first bytes (a header)."""
    span = max(1, min(len(data), region or len(data)))
    kind = rng.choice(["truncate", "flip", "flip", "random", "utf8", "nest", "empty"])
    if kind == "truncate":
        return kind, data[: rng.randrange(span)]
    if kind == "flip":
        out = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            out[rng.randrange(span)] ^= 1 << rng.randrange(8)
        return kind, bytes(out)
    if kind == "random":
        return kind, rng.randbytes(rng.randint(1, 256))
    if kind == "utf8":
        at = rng.randrange(span)
        return kind, data[:at] + b"\xff\xc3" + data[at:]
    if kind == "nest":
        depth = rng.choice([2000, 100000])
        return kind, rng.choice([b"[" * depth + b"]" * depth, b'{"a": ' * depth + b"1" + b"}" * depth])
    return kind, b""


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def check_failure(rc: int, err: str, what: str) -> None:
    assert rc in (1, 2), f"{what}: exit {rc}: {err}"
    assert one_line(err), f"{what}: {err}"


def safetensors_accepts(directory: Path) -> bool:
    """The reference: safetensors opens every weight file and reads every tensor."""
    try:
        for file in sorted(directory.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    f.get_tensor(name)
    except Exception:
        return False
    return True


def test_fuzz_safetensors_header(tmp_path, checkpoint_series, cli):
    rng = random.Random(SEED)
    ckpts = checkpoint_series(tmp_path / "ckpts", [0, 10])
    good = (ckpts[10] / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(good[:8], "little")
    outcomes = {"refused": 0, "accepted": 0}
    for i in range(CASES):
        kind, data = damage(good, rng, region=header_end)
        ckpt = tmp_path / f"case{i}"
        shutil.copytree(ckpts[10], ckpt)
        (ckpt / "model.safetensors").write_bytes(data)
        run, out = tmp_path / f"run{i}", tmp_path / f"out{i}"
        rc_add, _, err_add = cli("snapshot", "add", run, ckpt, "--step", 10)
        rc_x, _, err_x = cli("extrapolate", "weights", "--base-path", ckpts[0], "--second-path", ckpt, "--alpha", 2, "--out", out)
        if safetensors_accepts(ckpt) and data != b"":
            outcomes["accepted"] += 1
            assert rc_add == 0, f"case {i} ({kind}): safetensors reads it, rlvrx refuses: {err_add}"
            if rc_x:  # e.g. a flipped tensor name no longer matches the base: refused in one line
                check_failure(rc_x, err_x, f"case {i} ({kind})")
                assert not out.exists()
            continue
        outcomes["refused"] += 1
        check_failure(rc_add, err_add, f"case {i} ({kind}) snapshot add")
        check_failure(rc_x, err_x, f"case {i} ({kind}) extrapolate weights")
        assert "model.safetensors" in err_add and "model.safetensors" in err_x
        assert not run.exists() or not (run / "trajectory.json").exists()
        assert not out.exists()
    assert outcomes["refused"] >= CASES // 2, outcomes
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_fuzz_shard_index(tmp_path, write_safetensors_checkpoint, cli):
    rng = random.Random(SEED + 1)
    tensors = {f"layer{i}.weight": torch.randn(4, 4) for i in range(6)}
    source = write_safetensors_checkpoint(tmp_path / "source", tensors, shards=3)
    good = (source / "model.safetensors.index.json").read_bytes()
    for i in range(CASES):
        kind, data = damage(good, rng)
        ckpt = tmp_path / f"case{i}"
        shutil.copytree(source, ckpt)
        (ckpt / "model.safetensors.index.json").write_bytes(data)
        run = tmp_path / f"run{i}"
        rc, _, err = cli("snapshot", "add", run, ckpt, "--step", 1)
        if rc == 0:  # still a valid index naming the shards that hold each tensor
            weight_map = json.loads(data)["weight_map"]
            for name, shard in weight_map.items():
                with safe_open(str(ckpt / shard), framework="pt") as f:
                    assert name in f.keys()
            continue
        check_failure(rc, err, f"case {i} ({kind})")
        assert "model.safetensors.index.json" in err
        assert not (run / "trajectory.json").exists()


def test_fuzz_trajectory_manifest(tmp_path, checkpoint_series, cli):
    rng = random.Random(SEED + 2)
    run = tmp_path / "run"
    checkpoint_series(run / "checkpoints", [0, 10], name="step_{step:06d}")
    assert cli("snapshot", "scan", run / "checkpoints", "--run", run, "--no-hash")[0] == 0
    manifest = run / "trajectory.json"
    good = manifest.read_bytes()
    for i in range(CASES):
        kind, data = damage(good, rng)
        manifest.write_bytes(data)
        before = tree(run)
        for args in (
            ("snapshot", "list", run),
            ("snapshot", "verify", run, "--no-hash"),
            ("extrapolate", "weights", run, "--base", 0, "--second", 10, "--target", 20, "--register"),
        ):
            rc, _, err = cli(*args)
            if rc == 0:  # the damage left a manifest json itself reads as the same kind of list
                assert isinstance(json.loads(data), (list, dict)), f"case {i} ({kind}) {args[:2]}"
                continue
            if args[1] == "verify" and rc == 1 and "problem(s) in" in err:  # a report: one line per problem, then the count
                lines = err.strip().splitlines()
                assert all(x.startswith("x step ") for x in lines[:-1]) and lines[-1] == f"{len(lines) - 1} problem(s) in {manifest}", err
            else:
                check_failure(rc, err, f"case {i} ({kind}) {args[:2]}")
            assert tree(run) == before, f"case {i} ({kind}) {args[:2]}: the run dir changed"
        shutil.rmtree(run / "extrapolated", ignore_errors=True)
        manifest.write_bytes(good)


def test_fuzz_recipe(tmp_path, cli):
    rng = random.Random(SEED + 3)
    run = tmp_path / "run"
    good = (
        "backend: native\n"
        "model:\n  tiny: {layers: 1, hidden: 32, heads: 2, kv_heads: 1, intermediate: 64, max_position: 24}\n"
        "task:\n  name: arithmetic\n  digits: 1\n  n_train: 40\n  n_test: 8\n"
        "sft:\n  enabled: false\n"
        "grpo:\n  num_generations: 2\n  batch_size: 2\n  steps: 1\n  save_every: 1\n  max_new_tokens: 3\n"
        f"output:\n  dir: {run}\n"
    ).encode()
    refused = 0
    for i in range(CASES):
        kind, data = damage(good, rng)
        recipe = tmp_path / f"recipe{i}.yaml"
        recipe.write_bytes(data)
        rc, _, err = cli("recipe", "validate", recipe)
        if rc == 0:  # still a valid recipe: the reference YAML reader reads it as a mapping
            assert isinstance(yaml.safe_load(data), dict), f"case {i} ({kind})"
            continue
        refused += 1
        # a recipe is validated as a whole: its errors come all at once, one per line after the first
        assert rc == 2 and "Traceback" not in err and str(recipe) in err.splitlines()[0], f"case {i} ({kind}): {err}"
        rc_train, _, err_train = cli("train", recipe, "--no-progress")  # the same verdict, nothing written
        assert rc_train == rc and one_line(err_train) and str(recipe) in err_train, f"case {i} ({kind}): {err_train}"
        assert not run.exists()
    assert refused >= CASES // 2


def test_fuzz_metrics(tmp_path, cli):
    rng = random.Random(SEED + 4)
    run = tmp_path / "run"
    run.mkdir()
    records = [{"stage": "grpo", "step": s, "grad_step": s, "reward_mean": 0.1 * s, "elapsed": 1.5 * s, "test_accuracy": 0.05 * s} for s in range(8)]
    good = "".join(json.dumps(r) + "\n" for r in records).encode()
    for i in range(CASES // 2):  # each accepted case draws a plot: fewer cases here
        kind, data = damage(good, rng)
        (run / "metrics.jsonl").write_bytes(data)
        shutil.rmtree(run / "report", ignore_errors=True)
        rc, _, err = cli("report", run)
        if rc == 0:
            assert (run / "report" / "index.html").is_file()
            continue
        check_failure(rc, err, f"case {i} ({kind}) report")
        assert "metrics.jsonl" in err or "nothing to report" in err, err
        assert not (run / "report" / "index.html").exists()
