"""A real one-node Slurm cluster (slurm-wlm + munge on localhost, started by tests/slurm/start_cluster.sh)
runs the sbatch scripts `rlvrx slurm --command linearity --submit` renders: a job array of
`linearity weights --shard I/K`, then the merge job after it (afterok). The merged result equals a
local, unsharded run of the same analysis."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rlvrx.cli import app

pytestmark = pytest.mark.slurm

SCRIPTS = Path(__file__).resolve().parent / "slurm"
REPO = Path(__file__).resolve().parents[1]
MISSING = [tool for tool in ("sbatch", "squeue", "scontrol", "slurmctld", "slurmd", "munged") if shutil.which(tool) is None]
if MISSING:
    pytest.skip(f"needs Slurm and munge ({', '.join(MISSING)} missing): apt-get install slurm-wlm munge", allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("the test cluster's slurmd runs as root", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    result = subprocess.run(["bash", str(SCRIPTS / "start_cluster.sh"), str(state)], capture_output=True, text=True)
    if result.returncode != 0:
        subprocess.run(["bash", str(SCRIPTS / "stop_cluster.sh"), str(state)])
        pytest.fail(f"the test cluster did not start: {result.stderr[-2000:]}")
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPTS / "stop_cluster.sh"), str(state)])


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory) -> Path:
    """Five checkpoints of a tiny model drifting along a line plus noise (steps 0, 10, ..., 40)."""
    from rlvrx.io.writer import save_state_dict
    from rlvrx.tiny import save_tiny_model
    from rlvrx.trajectory import Trajectory

    run = tmp_path_factory.mktemp("traj") / "run"
    base = save_tiny_model(run / "checkpoints" / "step_000000", layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
    from rlvrx.io.reader import Checkpoint

    with Checkpoint(base) as ckpt:
        state0 = {name: ckpt.get(name) for name in ckpt.names()}
    gen = torch.Generator().manual_seed(0)
    drift = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in state0.items()}
    traj = Trajectory(run)
    traj.add(0, base, kind="base", hash=False)
    for step in (10, 20, 30, 40):
        state = {k: v + (step / 10) * drift[k] + 3e-4 * torch.randn(v.shape, generator=gen) for k, v in state0.items()}
        path = save_state_dict(run / "checkpoints" / f"step_{step:06d}", state, source_dir=base)
        traj.add(step, path, hash=False)
    traj.save()
    return run


def _wait(job_ids: list[str], env: dict, patience_s: float = 900) -> None:
    """Until the jobs leave the queue (a guard against a wedged cluster, not a performance limit)."""
    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], capture_output=True, text=True, env=env)
        if out.returncode == 0 and not out.stdout.strip():
            return
        time.sleep(1)
    pytest.fail(f"jobs {job_ids} still queued after {patience_s} s")


def test_scontrol_expands_node_ranges_like_the_verl_script_needs(cluster):
    out = subprocess.run(["scontrol", "show", "hostnames", "gpu[01-03],cpu7"], capture_output=True, text=True, env=cluster)
    assert out.stdout.split() == ["gpu01", "gpu02", "gpu03", "cpu7"]


def test_linearity_array_and_merge_on_slurm_equal_a_local_run(cluster, trajectory, tmp_path):
    rlvrx = [sys.executable, "-m", "rlvrx"]
    summary = tmp_path / "slurm.json"
    submitted = subprocess.run(
        [
            *rlvrx,
            "slurm",
            str(REPO / "recipes" / "quickstart.yaml"),
            f"output.dir={trajectory}",
            "--command",
            "linearity",
            "--shards",
            "2",
            "--cpus-per-task",
            "1",
            "--args",
            "--min-abs-change 0",
            "--submit",
            "--json",
            str(summary),
        ],
        capture_output=True,
        text=True,
        env=cluster,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    ids = json.loads(summary.read_text())["job_ids"]
    assert set(ids) == {"rlvrx-linearity-run", "rlvrx-linearity-run-merge"}
    _wait(list(ids.values()), cluster)

    logs = "\n".join(p.read_text() for p in sorted((trajectory / "slurm").glob("*.out")))
    merged_path = trajectory / "linearity" / "weights.json"
    assert merged_path.is_file(), logs[-3000:]
    parts = sorted((trajectory / "linearity" / "weights").glob("part-*-of-2.json"))
    assert [p.name for p in parts] == ["part-0-of-2.json", "part-1-of-2.json"]
    assert len(list((trajectory / "slurm").glob("rlvrx-linearity-run-*_*.out"))) == 2  # one log per array task

    local_path = tmp_path / "local.json"
    local = subprocess.run(
        [*rlvrx, "linearity", "weights", str(trajectory), "--min-abs-change", "0", "--out", str(tmp_path / "local"), "--no-plots", "--json", str(local_path)],
        capture_output=True,
        text=True,
    )
    assert local.returncode == 0, local.stderr[-2000:]
    merged, single = json.loads(merged_path.read_text()), json.loads(local_path.read_text())
    assert single["n_params"] > 10_000
    assert merged == single


def test_real_sbatch_reads_quoted_log_paths_and_the_dependency_chain(cluster, tmp_path, monkeypatch):
    """submit.sh under bash with the real sbatch: the array, then the merge after it; the logs land in a
    directory whose name holds spaces, quotes, `#`, `%` and `$(...)`, and nothing in it runs."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "x$(touch PWNED)y"
    out = tmp_path / "logs 'q' \"d\" #h 50%"
    python = tmp_path / "python"  # the cluster's python, standing in: when it ran, and its argv
    python.write_text('#!/bin/bash\necho "$(date +%s.%N) $*"\n')
    python.chmod(0o755)
    result = CliRunner().invoke(
        app,
        [
            "slurm",
            "quickstart",
            f"output.dir={run}",
            "--command",
            "linearity",
            "--shards",
            "2",
            "--cpus-per-task",
            "1",
            "--out",
            str(out),
            "--python",
            str(python),
            "--sbatch=--comment=a b # c",
        ],
    )
    assert result.exit_code == 0, result.output
    submitted = subprocess.run(["bash", str(out / "submit.sh")], capture_output=True, text=True, env=cluster, timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    array_id, merge_id = (line.split()[-1] for line in submitted.stdout.splitlines())
    _wait([array_id, merge_id], cluster)
    name = "rlvrx-linearity-x__touch_PWNED_y"
    logs = {p.name: p.read_text().strip().split(" ", 1) for p in out.glob("*.out")}
    weights = f"-m rlvrx linearity weights {run} --out {run}/linearity/weights"
    assert logs[f"{name}-{array_id}_0.out"][1] == f"{weights} --shard 0/2"
    assert logs[f"{name}-{array_id}_1.out"][1] == f"{weights} --shard 1/2"
    merge = logs[f"{name}-merge-{merge_id}.out"]
    assert merge[1].startswith(f"-m rlvrx linearity merge {run}/linearity/weights/part-0-of-2.json")
    # afterok: the merge ran after both array tasks.
    assert float(merge[0]) > max(float(logs[f"{name}-{array_id}_{i}.out"][0]) for i in (0, 1))
    job = subprocess.run(["scontrol", "show", "job", merge_id], capture_output=True, text=True, env=cluster, timeout=30)
    assert "Comment=a b # c" in job.stdout
    assert not list(tmp_path.rglob("PWNED"))
