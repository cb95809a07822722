"""Run directories, files and signals under real processes: locks, atomic writes killed midway,
--overwrite guards, damaged inputs, and one-line errors with the right exit codes (issue 17)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from clirun import run_cli
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rlvrx.io.atomic import atomic_dir, atomic_write_text
from rlvrx.io.reader import Checkpoint, read_header
from rlvrx.errors import CheckpointError

TIMEOUT = 300  # only so that a hung child fails the test instead of hanging it


def one_line(err: str) -> bool:
    return err.strip() != "" and "\n" not in err.strip() and "Traceback" not in err


def rlvrx(*args, cwd=None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m rlvrx ARGS` in a real process."""
    return subprocess.run([sys.executable, "-m", "rlvrx", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: what 'unchanged' is checked against."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if ".tmp-" in p.name or ".old-" in p.name)


# ----------------------------------------------------------------------------------------------
# 1. Locks


def test_eight_parallel_snapshot_adds_keep_every_step(tmp_path, checkpoint_series):
    ckpts = checkpoint_series(tmp_path / "ckpts", range(0, 80, 10))
    run = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "rlvrx", "snapshot", "add", str(run), str(path), "--step", str(step)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for step, path in ckpts.items()
    ]
    results = [(p.wait(timeout=TIMEOUT), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [rc for rc, _ in results] == [0] * 8, results
    entries = json.loads((run / "trajectory.json").read_text())
    assert [e["step"] for e in entries] == list(range(0, 80, 10))
    for entry in entries:  # each one registered with its own directory and its own hash
        assert Path(entry["path"]) == ckpts[entry["step"]].resolve()
        assert entry["sha256"] and len(entry["sha256"]) == 64
    assert len({e["sha256"] for e in entries}) == 8
    assert leftovers(run) == []


def _train_recipe(tmp_path: Path, run: Path, steps: int, model: dict | None = None, device: str | None = None) -> Path:
    recipe = {
        "model": model or {"tiny": {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 64, "max_position": 24}},
        "task": {"name": "arithmetic", "digits": 1, "n_train": 40, "n_test": 8},
        "sft": {"enabled": False},
        "grpo": {"num_generations": 2, "batch_size": 2, "steps": steps, "save_every": 1, "max_new_tokens": 3, "eval_examples": 4},
        "output": {"dir": str(run)},
    }
    if device is not None:
        recipe["model"]["device"] = device
    path = tmp_path / f"recipe-{run.name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def _wait_for_lock(lock: Path, pid: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not (lock.is_file() and lock.read_text().strip() == str(pid)):
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the first train never took the run lock"
        time.sleep(0.1)


def _registered(run: Path) -> list:
    try:
        return json.loads((run / "trajectory.json").read_text())  # written atomically: whole or absent
    except FileNotFoundError:
        return []


def test_second_train_on_a_run_is_refused_and_sigterm_leaves_nothing_half_written(tmp_path):
    run = tmp_path / "run"
    recipe = _train_recipe(tmp_path, run, steps=100000)
    first = subprocess.Popen([sys.executable, "-m", "rlvrx", "train", str(recipe), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lock(run / ".rlvrx.lock", first.pid, first)
        second = rlvrx("train", recipe, "--no-progress")
        assert second.returncode == 1, second.stderr
        assert one_line(second.stderr)
        assert f"run directory {run} is in use by pid {first.pid}" in second.stderr
        # let the first one write a few checkpoints, then stop it as Slurm does at its time limit
        deadline = time.monotonic() + TIMEOUT
        while len(_registered(run)) < 3:  # a checkpoint counts once trajectory.json lists it
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=TIMEOUT)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 143, err
    # (training's generation may print a library FutureWarning before it: not the error's business)
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM)" and "Traceback" not in err
    assert leftovers(run) == []
    # every registered checkpoint is complete and loads
    entries = json.loads((run / "trajectory.json").read_text())
    assert len(entries) >= 3
    for entry in entries:
        path = run / entry["path"]
        assert Checkpoint(path).infos() and (path / "trainer_state.pt").is_file()
    # the lock died with its holder: a third train (resuming, with a smaller budget) is admitted
    third = rlvrx("train", recipe, "grpo.steps=1", "--force", "--no-progress")
    assert third.returncode == 0, third.stderr


# ----------------------------------------------------------------------------------------------
# 2. --overwrite guards


def test_overwrite_never_deletes_a_run_or_a_parent_of_inputs(tmp_path, checkpoint_series, cli):
    run = tmp_path / "run"
    ckpts = checkpoint_series(run / "checkpoints", [0, 10], name="step_{step:06d}")
    assert cli("snapshot", "scan", run / "checkpoints", "--run", run, "--no-hash")[0] == 0
    before = snapshot(run)

    # the run dir itself (the parent of the inputs)
    rc, _, err = cli("extrapolate", "weights", run, "--base", 0, "--second", 10, "--target", 20, "--out", run, "--overwrite")
    assert rc == 2 and one_line(err) and "holds the input checkpoint" in err
    # the checkpoints dir (a parent of the inputs, not a run)
    rc, _, err = cli("extrapolate", "weights", run, "--base", 0, "--second", 10, "--target", 20, "--out", run / "checkpoints", "--overwrite")
    assert rc == 2 and one_line(err) and "holds the input checkpoint" in err
    assert snapshot(run) == before

    # another run directory, which holds none of the inputs
    other = tmp_path / "other"
    other.mkdir()
    (other / "trajectory.json").write_text("[]\n")
    rc, _, err = cli("extrapolate", "weights", "--base-path", ckpts[0], "--second-path", ckpts[10], "--alpha", 2, "--out", other, "--overwrite")
    assert rc == 2 and one_line(err) and "is a run directory" in err
    assert (other / "trajectory.json").read_text() == "[]\n"
    # a directory of other things
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    rc, _, err = cli("extrapolate", "weights", "--base-path", ckpts[0], "--second-path", ckpts[10], "--alpha", 2, "--out", notes, "--overwrite")
    assert rc == 2 and one_line(err) and "not a checkpoint directory" in err
    assert (notes / "todo.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []


def test_overwrite_replaces_the_old_output_only_once_the_new_one_is_complete(tmp_path, checkpoint_series, cli):
    ckpts = checkpoint_series(tmp_path / "ckpts", [0, 10])
    out = tmp_path / "out"
    rc, _, err = cli("extrapolate", "weights", "--base-path", ckpts[0], "--second-path", ckpts[10], "--alpha", 2, "--out", out)
    assert rc == 0, err
    old = snapshot(out)
    # a second input whose last extrapolated tensor is not finite: the failure comes after the others were written
    tensors = load_file(str(ckpts[10] / "model.safetensors"))
    last = [n for n in Checkpoint(ckpts[10]).names() if "norm" not in n][-1]
    tensors[last] = tensors[last].clone()
    tensors[last].view(-1)[0] = float("inf")
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    rc, _, err = cli("extrapolate", "weights", "--base-path", ckpts[0], "--second-path", bad, "--alpha", 2, "--out", out, "--overwrite")
    assert rc in (1, 2) and one_line(err) and last in err
    assert snapshot(out) == old
    assert leftovers(tmp_path) == []
    # a good rerun replaces it: the new weights are 2 * W10 - W0
    rc, _, err = cli("extrapolate", "weights", "--base-path", ckpts[0], "--second-path", ckpts[10], "--alpha", 3, "--out", out, "--overwrite")
    assert rc == 0, err
    got = load_file(str(out / "model.safetensors"))
    w0, w10 = load_file(str(ckpts[0] / "model.safetensors")), load_file(str(ckpts[10] / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(got[name], w0[name] + 3 * (w10[name] - w0[name]), rtol=0, atol=1e-6)
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# 3. recipe.yaml only once the run starts


def test_a_train_that_fails_on_its_recipe_leaves_no_recipe_and_the_corrected_rerun_runs(tmp_path, tiny_model_dir, cli):
    run = tmp_path / "run"
    run.write_text("a file")
    rc, _, err = cli("train", _train_recipe(tmp_path, run, steps=1), "--no-progress")
    assert rc == 2 and one_line(err) and f"output.dir {run} is a file" in err
    run.unlink()
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_model_dir / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"")
    rc, _, err = cli("train", _train_recipe(tmp_path, run, steps=1, model={"path": str(broken)}), "--no-progress")
    assert rc == 1 and one_line(err) and str(broken / "model.safetensors") in err
    assert not (run / "recipe.yaml").exists() and not (run / "trajectory.json").exists()
    rc, _, err = cli("train", _train_recipe(tmp_path, run, steps=1, model={"path": str(broken)}, device="cuda"), "--no-progress")
    if not torch.cuda.is_available():
        assert rc == 2 and one_line(err) and "model.device cuda: no CUDA device" in err
    rc, _, err = cli("train", _train_recipe(tmp_path, run, steps=1, model={"path": str(tiny_model_dir)}), "--no-progress")
    assert rc == 0, err
    assert (run / "recipe.yaml").is_file()
    assert [e["step"] for e in json.loads((run / "trajectory.json").read_text())] == [0, 1]


def test_resume_drops_a_torn_metrics_line(tmp_path, cli):
    run = tmp_path / "run"
    recipe = _train_recipe(tmp_path, run, steps=2)
    assert cli("train", recipe, "--no-progress")[0] == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2]
    # killed mid-append after step 2: a torn line; step 3 is then trained on resume
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "stage": "grpo", "rew')
    rc, _, err = cli("report", run)
    assert rc == 0, err
    rc, out, err = cli("rl-extra", "compare", run, run, "--png", tmp_path / "compare.png")
    assert rc == 0 and (tmp_path / "compare.png").is_file(), err
    rc, _, err = cli("train", recipe, "grpo.steps=3", "--force", "--no-progress")
    assert rc == 0, err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [json.loads(x) for x in lines] == records[:3]
    # damage that is not a torn tail: one line naming the file and the line
    text = (run / "metrics.jsonl").read_text().splitlines()
    text[1] = text[1][:-3]
    (run / "metrics.jsonl").write_text("\n".join(text) + "\n")
    rc, _, err = cli("report", run)
    assert rc == 2 and one_line(err) and f"{run / 'metrics.jsonl'}:2" in err


# ----------------------------------------------------------------------------------------------
# 4. Signals and killed writers


KILLED_MID_WRITE = textwrap.dedent("""
    import sys, time
    import rlvrx.extrapolate.weights as w

    real = w._extrapolate_tensor
    calls = []

    def slow(*args, **kwargs):  # the second extrapolated tensor: the first is already queued for writing
        calls.append(1)
        if len(calls) == 2:
            print("writing", flush=True)
            time.sleep(120)
        return real(*args, **kwargs)

    w._extrapolate_tensor = slow
    sys.argv = ["rlvrx", *sys.argv[1:]]
    from rlvrx.cli import main
    main()
""")


@pytest.mark.parametrize("existing", [False, True])
def test_sigterm_mid_write_leaves_no_temporary_and_the_old_output(tmp_path, checkpoint_series, existing):
    ckpts = checkpoint_series(tmp_path / "ckpts", [0, 10])
    out = tmp_path / "out"
    args = ["extrapolate", "weights", "--base-path", ckpts[0], "--second-path", ckpts[10], "--alpha", 2, "--out", out]
    if existing:
        assert rlvrx(*args).returncode == 0
        old = snapshot(out)
        args.append("--overwrite")
    script = tmp_path / "slow_writer.py"
    script.write_text(KILLED_MID_WRITE)
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out.tmp-")], "no temporary output while writing"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143 and one_line(err) and "SIGTERM" in err
    assert leftovers(tmp_path) == []
    if existing:
        assert snapshot(out) == old
    else:
        assert not out.exists()


KILLED_BETWEEN_RENAMES = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from rlvrx.io.atomic import atomic_dir

    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if ".old-" in str(dst):  # the old output was moved aside; the new one is not in place yet
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    with atomic_dir(Path(sys.argv[1]), overwrite=True) as tmp:
        (tmp / "weights.txt").write_text("new")
""")


def test_a_writer_killed_between_the_two_renames_gets_its_old_output_back(tmp_path, checkpoint_series, cli):
    ckpts = checkpoint_series(tmp_path / "ckpts", [0, 10])
    out = tmp_path / "out"
    assert cli("extrapolate", "weights", "--base-path", ckpts[0], "--second-path", ckpts[10], "--alpha", 2, "--out", out)[0] == 0
    old = snapshot(out)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_BETWEEN_RENAMES)
    proc = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(aside) == 1 and snapshot(aside[0] / "out") == old
    # the next start of a writer of `out` puts it back (and then, without --overwrite, keeps it)
    rc, _, err = cli("extrapolate", "weights", "--base-path", ckpts[0], "--second-path", ckpts[10], "--alpha", 2, "--out", out)
    assert rc == 2 and one_line(err) and "already exists" in err
    assert snapshot(out) == old
    assert leftovers(tmp_path) == []


def test_only_dead_writers_temporaries_are_removed(tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    host = socket.gethostname()
    out = tmp_path / "out"
    stale = tmp_path / f"out.tmp-{host}-{dead}-abcd1234"
    live = tmp_path / f"out.tmp-{host}-{os.getpid()}-abcd1234"  # a live writer (this process)
    foreign = tmp_path / f"out.tmp-some-other-node-{dead}-abcd1234"  # another host's pid says nothing here
    stale_file = tmp_path / f".out.json.tmp-{host}-{dead}-abcd1234.json"
    for d in (stale, live, foreign):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    stale_file.write_text("{")
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("a")
    atomic_write_text(tmp_path / "out.json", "{}\n")
    assert not stale.exists() and not stale_file.exists()
    assert live.exists() and foreign.exists()
    assert (out / "a").read_text() == "a" and (tmp_path / "out.json").read_text() == "{}\n"


# ----------------------------------------------------------------------------------------------
# 5. Shards outside the checkpoint, header offsets as safetensors checks them


def test_index_naming_a_shard_outside_the_checkpoint_is_refused(tmp_path, write_safetensors_checkpoint, cli):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    ckpt = write_safetensors_checkpoint(tmp_path / "run" / "ckpt", tensors, shards=2)
    run = tmp_path / "run"
    assert cli("snapshot", "add", run, ckpt, "--step", 0)[0] == 0
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["b"]
    os.replace(ckpt / shard, tmp_path / "outside.safetensors")
    index["weight_map"]["b"] = "../../outside.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    rc, _, err = cli("snapshot", "verify", run)
    assert rc == 1 and "shard '../../outside.safetensors' is not a file name inside" in err and "Traceback" not in err
    for bad in ("/etc/passwd", "sub/x.safetensors", ".."):
        index["weight_map"]["b"] = bad
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="is not a file name inside"):
            Checkpoint(ckpt)


def _raw_safetensors(path: Path, header: dict, data_bytes: int) -> Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(range(256)) * (data_bytes // 256) + bytes(data_bytes % 256))
    return path


HEADERS = {  # two float32 tensors of 4 values (16 bytes each); data section length given separately
    "overlapping": ({"a": [0, 16], "b": [8, 24]}, 24),
    "gap": ({"a": [0, 16], "b": [20, 36]}, 36),
    "not from zero": ({"a": [4, 20], "b": [20, 36]}, 36),
    "trailing bytes": ({"a": [0, 16], "b": [16, 32]}, 40),
    "same range twice": ({"a": [0, 16], "b": [0, 16]}, 16),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_read_header_rejects_what_safetensors_rejects(tmp_path, case):
    offsets, size = HEADERS[case]
    header = {name: {"dtype": "F32", "shape": [4], "data_offsets": span} for name, span in offsets.items()}
    path = _raw_safetensors(tmp_path / "model.safetensors", header, size)
    with pytest.raises(SafetensorError):  # the reference: safetensors itself refuses the file
        safe_open(str(path), framework="pt")
    with pytest.raises(CheckpointError) as err:
        read_header(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_read_header_accepts_tensors_listed_out_of_offset_order(tmp_path):
    header = {"b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}, "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    path = _raw_safetensors(tmp_path / "model.safetensors", header, 32)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == ["a", "b"]
    parsed, start = read_header(path)
    assert start == path.stat().st_size - 32 and parsed["a"]["data_offsets"] == [0, 16]


# ----------------------------------------------------------------------------------------------
# 6-7. One line, the right exit code


def test_damaged_run_files_are_one_line_errors(tmp_path, checkpoint_series, cli):
    run = tmp_path / "run"
    checkpoint_series(run / "checkpoints", [0, 10], name="step_{step:06d}")
    assert cli("snapshot", "scan", run / "checkpoints", "--run", run, "--no-hash")[0] == 0
    manifest = run / "trajectory.json"
    good = manifest.read_bytes()
    for damage, expected in (
        (good[:40] + b"\xff\xfe" + good[40:], "not UTF-8"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ):
        manifest.write_bytes(damage)
        for args in (
            ("snapshot", "list", run),
            ("snapshot", "verify", run),
            ("report", run),
            ("extrapolate", "weights", run, "--base", 0, "--second", 10, "--target", 20),
        ):
            rc, _, err = cli(*args)
            assert rc == 2 and one_line(err) and expected in err and str(manifest) in err, (args, err)
    manifest.write_bytes(good)
    (run / "stages").mkdir()
    for damage, expected in ((b'{"a": ' * 100000, "nested too deeply"), (b'{"a": 1', "invalid JSON"), (b"[1]", "expected a JSON object")):
        (run / "stages" / "train.json").write_bytes(damage)
        rc, _, err = cli("report", run)
        assert rc == 2 and one_line(err) and expected in err and "train.json" in err, err
    (run / "stages" / "train.json").unlink()
    (run / "stages" / "eval.json").write_text('{"real@10": ["pass@1", 0.5]}')
    rc, _, err = cli("report", run)
    assert rc == 2 and one_line(err) and "eval.json: model 'real@10' must map task names" in err, err
    assert not (run / "report" / "index.html").exists()


def test_bad_options_are_one_line_usage_errors(tmp_path, checkpoint_series, cli):
    ckpts = checkpoint_series(tmp_path / "ckpts", [0, 10])
    out = tmp_path / "out"
    two = ["extrapolate", "weights", "--base-path", ckpts[0], "--second-path", ckpts[10], "--out", out]
    for alpha in ("nan", "inf", "-inf"):
        rc, _, err = cli(*two, "--alpha", alpha)
        assert rc == 2 and one_line(err) and "--alpha" in err and "finite" in err
    rc, _, err = cli(*two, "--alpha", 2, "--copy-pattern", "")
    assert rc == 2 and one_line(err) and "--copy-pattern ''" in err
    rc, _, err = cli(*two, "--alpha", 2, "--copy-pattern", "norm", "--copy-pattern", " ")
    assert rc == 2 and one_line(err) and "--copy-pattern" in err
    assert not out.exists() and leftovers(tmp_path) == []
    # a zero-byte or garbage weights file: one line naming it
    for name, data in (("empty", b""), ("garbage", b"\x10" + bytes(7) + b"{not a header}" + bytes(64))):
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_bytes((ckpts[10] / "config.json").read_bytes())
        (bad / "model.safetensors").write_bytes(data)
        rc, _, err = cli("extrapolate", "weights", "--base-path", ckpts[0], "--second-path", bad, "--alpha", 2, "--out", out)
        assert rc == 1 and one_line(err) and str(bad / "model.safetensors") in err, err
    assert not out.exists() and leftovers(tmp_path) == []
    # the same missing directory, through add and through scan: exit 2 both
    missing = tmp_path / "no-such-dir"
    for args in (("snapshot", "add", tmp_path / "run", missing, "--step", 1), ("snapshot", "scan", missing, "--run", tmp_path / "run")):
        rc, _, err = cli(*args)
        assert rc == 2 and one_line(err) and str(missing) in err, (args, err)
    assert not (tmp_path / "run" / "trajectory.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_device_cuda_without_cuda_is_one_line(tmp_path, checkpoint_series, cli):
    ckpts = checkpoint_series(tmp_path / "ckpts", [0, 10, 20])
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    args = ["linearity", "logprobs"] + [a for s, p in ckpts.items() for a in ("--checkpoint", f"{s}={p}")]
    rc, _, err = cli(*args, "--probes", probes, "--device", "cuda", "--out", tmp_path / "lin")
    assert rc == 2 and one_line(err) and "--device cuda: no CUDA device" in err, err
    assert not (tmp_path / "lin").exists()
