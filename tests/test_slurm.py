"""sbatch rendering: the scripts' own bash runs here with stand-ins for srun/scontrol/python that log
their arguments, so node iteration, Ray head/worker placement, array sharding and the submit order
are checked by executing them. The real cluster run is tests/test_slurm_cluster.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from rlvrx.backends.slurm import SlurmOptions, array_shard, build_scripts, render_submit, slurm_env, write_scripts
from rlvrx.errors import UsageError

STUB = """#!/bin/bash
echo "$(basename "$0") $*" >> "$STUB_LOG"
case "$(basename "$0") $1 $2" in
  "scontrol show hostnames") printf '%s\\n' gpu01 gpu02 gpu03 ;;
  "srun "*) for a in "$@"; do [ "$a" = hostname ] && { echo 10.0.0.1; exit 0; }; done
            while [ $# -gt 0 ]; do case "$1" in -w) shift 2 ;; -*) shift ;; *) exec "$@" ;; esac; done ;;
  "python -c"*) echo 3 ;;
esac
exit 0
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("scontrol", "srun", "python", "sleep"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run(script: Path, stubs: Path, env: dict) -> list[str]:
    log = stubs.parent / "log.txt"
    full = {**os.environ, **env, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log)}
    result = subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return log.read_text().splitlines()


def test_verl_job_starts_ray_head_on_first_node_and_workers_on_the_rest(tmp_path, stubs):
    opts = SlurmOptions(nodes=3, gpus_per_node=8, cpus_per_task=32, partition="gpu", time="1-00:00:00", account="lab",
                        python=str(stubs / "python"))
    (script,) = build_scripts("train", "/r/deepscaler.yaml", ["grpo.lr=2e-6"], tmp_path / "run", [], opts, tmp_path / "out")
    write_scripts([script], tmp_path / "out")
    header = [line for line in script.text.splitlines() if line.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --job-name=rlvrx-train-run", "#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={tmp_path / 'out'}/%x-%A.out", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=32",
        "#SBATCH --partition=gpu", "#SBATCH --time=1-00:00:00", "#SBATCH --account=lab",
    ]
    calls = _run(script.path, stubs, {"SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_NNODES": "3", "SLURM_CPUS_PER_TASK": "32"})
    ray_starts = [c for c in calls if c.startswith("srun") and "ray.scripts.scripts start" in c]
    assert len(ray_starts) == 3
    assert "-w gpu01" in ray_starts[0] and "--head --node-ip-address=10.0.0.1 --port=6379 --num-gpus=8 --num-cpus=32" in ray_starts[0]
    assert {c.split("-w ")[1].split()[0] for c in ray_starts[1:]} == {"gpu02", "gpu03"}
    assert all("--address=10.0.0.1:6379" in c for c in ray_starts[1:])
    driver = [c for c in calls if c.startswith("python -m rlvrx")]
    assert driver == ["python -m rlvrx train /r/deepscaler.yaml grpo.lr=2e-6 verl.nnodes=3 verl.n_gpus_per_node=8"]
    assert any(c.startswith("srun --overlap --nodes=1 --ntasks=1 -w gpu01") for c in calls)


def test_linearity_array_shards_and_dependent_merge(tmp_path, stubs):
    opts = SlurmOptions(shards=3, gpus_per_node=8, python=str(stubs / "python"))
    scripts = build_scripts("linearity", "/r/q.yaml", [], tmp_path / "run", ["--sample", "0.001"], opts, tmp_path / "out")
    submit_sh = write_scripts(scripts, tmp_path / "out")
    array, merge = scripts
    assert "#SBATCH --array=0-2" in array.text and "--gpus-per-node" not in array.text + merge.text
    assert merge.depends_on == array.name
    run = tmp_path / "run"
    for task in (0, 1, 2):
        calls = _run(array.path, stubs, {"SLURM_ARRAY_TASK_ID": str(10 + task), "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3"})
    shards = [c.split("--shard ")[1] for c in calls if "--shard" in c]
    assert shards == ["0/3", "1/3", "2/3"]
    assert calls[0] == f"python -m rlvrx linearity weights {run} --out {run}/linearity/weights --sample 0.001 --shard 0/3"
    calls = _run(merge.path, stubs, {})
    parts = " ".join(f"{run}/linearity/weights/part-{i}-of-3.json" for i in range(3))
    assert calls[-1] == f"python -m rlvrx linearity merge {parts} --json {run}/linearity/weights.json --out {run}/linearity/weights"
    text = submit_sh.read_text()
    assert text.index(array.path.name) < text.index("--dependency=afterok:${rlvrx_linearity_run_id}")


def test_arguments_are_quoted_and_bad_options_refused(tmp_path):
    opts = SlurmOptions(python="/opt/my env/bin/python")
    (script,) = build_scripts("eval", "/r/q.yaml", [], tmp_path / "run", ["run:100", "--task", "aime 24; rm -rf /"], opts, tmp_path)
    assert "PY='/opt/my env/bin/python'" in script.text
    assert """"$PY" -m rlvrx eval run:100 --task 'aime 24; rm -rf /'""" in script.text
    with pytest.raises(UsageError, match="--command"):
        build_scripts("sft", "/r/q.yaml", [], tmp_path, [], SlurmOptions(), tmp_path)
    with pytest.raises(UsageError, match="--nodes"):
        build_scripts("train", "/r/q.yaml", [], tmp_path, [], SlurmOptions(nodes=0), tmp_path)
    assert "afterok" not in render_submit([script])


def test_slurm_environment_is_read_from_slurm_variables():
    assert slurm_env({}) is None and array_shard({}) is None
    env = {"SLURM_JOB_ID": "42", "SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_NNODES": "2",
           "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5"}
    info = slurm_env(env)
    assert (info["job_id"], info["procid"], info["ntasks"], info["nnodes"]) == ("42", 3, 8, 2)
    assert array_shard(env) == (2, 4)
    assert array_shard({"SLURM_JOB_ID": "1", "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}) == (0, 2)
