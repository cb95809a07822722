"""sbatch rendering: the generated scripts run here under bash, with stand-ins for sbatch, srun,
scontrol and the cluster's python that record their argv, so node iteration, Ray head/worker
placement, array sharding, the submit order, the dependency chain and the quoting are checked by
executing them. `#SBATCH` lines are read back with a port of sbatch's own line splitter.
The real cluster run is tests/test_slurm_cluster.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlvrx.backends.slurm import SlurmOptions, array_shard, build_scripts, render_submit, slurm_env, write_scripts
from rlvrx.cli import app
from rlvrx.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))

# Each stand-in appends one line to $STUB_LOG: its name and its arguments, tab-separated, in one write
# (the Ray head and workers run in the background: several printf calls per line would interleave).
STUB = """#!/bin/bash
line=$(basename "$0"); for a in "$@"; do line+=$'\\t'"$a"; done
printf '%s\\n' "$line" >> "$STUB_LOG"
case "$(basename "$0") $1 $2" in
  "scontrol show hostnames") printf '%s\\n' gpu01 gpu02 gpu03 ;;
  "srun "*) for a in "$@"; do [ "$a" = hostname ] && { echo 10.0.0.1; exit 0; }; done
            while [ $# -gt 0 ]; do case "$1" in -w) shift 2 ;; -*) shift ;; *) exec "$@" ;; esac; done ;;
  "python -c"*) echo 3 ;;
  "sbatch "*) [ -f "${@: -1}" ] || { echo "sbatch: no such script ${@: -1}" >&2; exit 1; }
              n=$(cat "$STUB_LOG.ids" 2>/dev/null || echo 4242); echo $((n + 1)) > "$STUB_LOG.ids"
              echo "$n;cluster" ;;
esac
exit 0
"""


@pytest.fixture
def stubs(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("scontrol", "srun", "python", "sleep", "sbatch"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run(script: Path, stubs: Path, env: dict, cwd: Path | None = None) -> list[list[str]]:
    """Run SCRIPT under bash with the stand-ins first on PATH; the argv of every stand-in call since the last run."""
    log = stubs.parent / "log.txt"
    log.write_text("")
    full = {**os.environ, **env, "PATH": f"{stubs}:{os.environ['PATH']}", "STUB_LOG": str(log)}
    result = subprocess.run(["bash", str(script)], env=full, capture_output=True, text=True, cwd=cwd, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in log.read_text().splitlines()]


def _joined(calls: list[list[str]]) -> list[str]:
    return [" ".join(c) for c in calls]


def sbatch_arguments(line: str) -> list[str]:
    """The arguments sbatch reads from one `#SBATCH` line: a port of _get_argument in Slurm's
    src/sbatch/opt.c (whitespace splits unless quoted by " or ', backslash escapes the next
    character, an unescaped # outside quotes ends the line; an unmatched quote is fatal)."""
    assert line.startswith("#SBATCH")
    text, args, i = line[len("#SBATCH") :], [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return args
        arg, quote, escape = [], None, False
        while i < len(text) and (quote or not text[i].isspace()):
            ch = text[i]
            if escape:
                escape = False
            elif ch == "\\":
                escape, i = True, i + 1
                continue
            elif quote:
                if ch == quote:
                    quote, i = None, i + 1
                    continue
            elif ch in "\"'":
                quote, i = ch, i + 1
                continue
            elif ch == "#":
                return args + (["".join(arg)] if arg else [])
            arg.append(ch)
            i += 1
        assert quote is None, f"sbatch would stop: unmatched {quote} in {line!r}"
        args.append("".join(arg))


def sbatch_options(text: str) -> list[str]:
    return [arg for line in text.splitlines() if line.startswith("#SBATCH") for arg in sbatch_arguments(line)]


def test_sbatch_line_port_reads_slurms_quoting():
    assert sbatch_arguments('#SBATCH --output="/a b/%x.out" --qos=high # note') == ["--output=/a b/%x.out", "--qos=high"]
    assert sbatch_arguments(r"#SBATCH --x=a\ b\#c 'd e'") == ["--x=a", "b#c", "d e"]


def test_verl_job_starts_ray_head_on_first_node_and_workers_on_the_rest(tmp_path, stubs):
    opts = SlurmOptions(nodes=3, gpus_per_node=8, cpus_per_task=32, partition="gpu", time="1-00:00:00", account="lab", python=str(stubs / "python"))
    (script,) = build_scripts("train", "/r/deepscaler.yaml", ["grpo.lr=2e-6"], tmp_path / "run", [], opts, tmp_path / "out")
    write_scripts([script], tmp_path / "out")
    header = [line for line in script.text.splitlines() if line.startswith("#SBATCH")]
    assert header == [
        "#SBATCH --job-name=rlvrx-train-run",
        "#SBATCH --nodes=3",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={tmp_path / 'out'}/%x-%A.out",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=32",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --account=lab",
    ]
    calls = _joined(_run(script.path, stubs, {"SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_NNODES": "3", "SLURM_CPUS_PER_TASK": "32"}))
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
    shards = []
    for task in (0, 1, 2):
        calls = _joined(_run(array.path, stubs, {"SLURM_ARRAY_TASK_ID": str(10 + task), "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_COUNT": "3"}))
        shards += [c.split("--shard ")[1] for c in calls if "--shard" in c]
    assert shards == ["0/3", "1/3", "2/3"]
    assert calls[0] == f"python -m rlvrx linearity weights {run} --out {run}/linearity/weights --sample 0.001 --shard 2/3"
    calls = _joined(_run(merge.path, stubs, {}))
    parts = " ".join(f"{run}/linearity/weights/part-{i}-of-3.json" for i in range(3))
    assert calls[-1] == f"python -m rlvrx linearity merge {parts} --json {run}/linearity/weights.json --out {run}/linearity/weights"
    submitted = _run(submit_sh, stubs, {})
    assert submitted == [["sbatch", "--parsable", array.path.name], ["sbatch", "--parsable", "--dependency=afterok:4242", merge.path.name]]


def _expected_argv(command: str, recipe: Path, run: Path, eval_args: list[str]) -> list[list[str]]:
    """The rlvrx argv each generated script must hand to the cluster's python, in submit order."""
    if command in ("train", "rl-extra"):
        return [["-m", "rlvrx", command, str(recipe), f"output.dir={run}", "verl.nnodes=2", "verl.n_gpus_per_node=8"]]
    if command == "eval":
        return [["-m", "rlvrx", "eval", *eval_args]]
    parts = run / "linearity" / "weights"
    return [
        ["-m", "rlvrx", "linearity", "weights", str(run), "--out", str(parts), "--min-abs-change", "0", "--shard", "1/2"],
        [
            "-m",
            "rlvrx",
            "linearity",
            "merge",
            *(str(parts / f"part-{i}-of-2.json") for i in range(2)),
            "--json",
            str(run / "linearity" / "weights.json"),
            "--out",
            str(parts),
        ],
    ]


@pytest.mark.parametrize("command", ["train", "rl-extra", "eval", "linearity"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_renders_scripts_that_submit_and_run(recipe, command, tmp_path, stubs, monkeypatch):
    """The issue's case: `rlvrx slurm deepscaler-1.5b-grpo ... && bash .../submit.sh` (a dot in the name)."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs dir" / recipe  # a space in the path too
    eval_args = [f"{run}:100", "--task", "aime 24", "-n", "4"]
    args = [
        "slurm",
        recipe,
        f"output.dir={run}",
        "--command",
        command,
        "--nodes",
        "2",
        "--gpus-per-node",
        "8",
        "--shards",
        "2",
        "--python",
        str(stubs / "python"),
        "--time",
        "1-00:00:00",
    ]
    args += ["--args", " ".join(f"'{a}'" for a in eval_args)] if command == "eval" else []
    args += ["--args", "--min-abs-change 0"] if command == "linearity" else []
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    out = run / "slurm"
    submit_sh = out / "submit.sh"
    scripts = sorted(out.glob("*.sbatch"), key=lambda p: p.name.endswith("-merge.sbatch"))
    assert len(scripts) == (2 if command == "linearity" else 1)
    for script in [submit_sh, *scripts]:
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr

    # submit.sh: each script once, in order, the merge after the array's job id.
    submitted = _run(submit_sh, stubs, {})
    assert [c[-1] for c in submitted] == [s.name for s in scripts]
    assert [c[:2] for c in submitted] == [["sbatch", "--parsable"]] * len(scripts)
    assert [c[2:-1] for c in submitted] == [[]] + [["--dependency=afterok:4242"]] * (len(scripts) - 1)

    # Each script: the #SBATCH options sbatch reads, and the rlvrx command line the job runs.
    env = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_MIN": "0"}
    expected = _expected_argv(command, REPO / "recipes" / f"{recipe}.yaml", run, eval_args)
    for script, argv in zip(scripts, expected):
        options = sbatch_options(script.read_text())
        assert f"--output={out}/%x-%A{'_%a' if '--array=0-1' in options else ''}.out" in options
        assert f"--job-name={script.stem}" in options and "--time=1-00:00:00" in options
        ran = [c[1:] for c in _run(script, stubs, env) if c[0] == "python" and c[1:3] == ["-m", "rlvrx"]]
        assert ran == [argv]


def test_command_substitution_in_output_dir_never_runs(tmp_path, stubs, monkeypatch):
    """Issue #17: `rlvrx slurm q.yaml 'output.dir=runs/x$(touch PWNED)y' --command linearity`."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "slurm",
            "quickstart",
            "output.dir=runs/x$(touch PWNED)y",
            "--command",
            "linearity",
            "--shards",
            "2",
            "--python",
            str(stubs / "python"),
            "--partition",
            "gpu `touch PWNED`",
        ],
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "x$(touch PWNED)y"
    out = run / "slurm"
    scripts = sorted(out.glob("*.sbatch"))
    assert [p.name for p in scripts] == ["rlvrx-linearity-x__touch_PWNED_y-merge.sbatch", "rlvrx-linearity-x__touch_PWNED_y.sbatch"]
    submitted = _run(out / "submit.sh", stubs, {}, cwd=tmp_path)
    assert len(submitted) == 2
    calls = []
    for script in scripts:
        options = sbatch_options(script.read_text())
        assert f"--output={out}/%x-%A{'_%a' if '--array=0-1' in options else ''}.out" in options
        assert "--partition=gpu `touch PWNED`" in options
        calls += _run(script, stubs, {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}, cwd=tmp_path)
    weights = next(c for c in calls if c[:5] == ["python", "-m", "rlvrx", "linearity", "weights"])
    assert weights[5] == str(run)  # the literal name reached rlvrx
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()


@pytest.mark.parametrize("param", ["run_dir", "partition", "time", "account", "sbatch_args", "out_dir"])
def test_a_line_break_in_any_sbatch_value_is_refused(param, tmp_path):
    value = "gpu\n#SBATCH --wrap=touch PWNED"
    kwargs = {"python": sys.executable}
    run, out = tmp_path / "run", tmp_path / "out"
    if param == "run_dir":
        run = tmp_path / value
    elif param == "out_dir":
        out = tmp_path / value
    elif param == "sbatch_args":
        kwargs["sbatch_args"] = [f"--qos={value}"]
    else:
        kwargs[param] = value
    with pytest.raises(UsageError, match=rf"^{param}: .*line break"):
        build_scripts("eval", "/r/q.yaml", [], run, ["x"], SlurmOptions(**kwargs), out)


def test_cli_refuses_a_newline_with_one_line_and_exit_2(tmp_path):
    # A YAML double-quoted override: "\n" in it is a real line break in output.dir.
    result = subprocess.run(
        [sys.executable, "-m", "rlvrx", "slurm", "quickstart", f'output.dir="{tmp_path}/a\\nb"', "--command", "linearity"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and "output.dir" in result.stderr and "line break" in result.stderr
    assert not (tmp_path / "a").exists()


def test_log_paths_with_quotes_hashes_and_percent_read_back_exactly(tmp_path):
    out = tmp_path / "logs 'a' \"b\" #c 50%"
    (script,) = build_scripts("eval", "/r/q.yaml", [], tmp_path / "run", ["x"], SlurmOptions(sbatch_args=["--comment=a b # c"]), out)
    options = sbatch_options(script.text)
    assert f"--output={str(out).replace('%', '%%')}/%x-%A.out" in options and "--comment=a b # c" in options
    with pytest.raises(UsageError, match="backslash"):
        build_scripts("eval", "/r/q.yaml", [], tmp_path / "run", ["x"], SlurmOptions(), tmp_path / "a\\b")
    with pytest.raises(UsageError, match="one sbatch option per sbatch_args"):
        build_scripts("eval", "/r/q.yaml", [], tmp_path / "run", ["x"], SlurmOptions(sbatch_args=["qos=high"]), out)


def test_arguments_are_quoted_and_bad_options_refused(tmp_path):
    opts = SlurmOptions(python="/opt/my env/bin/python")
    (script,) = build_scripts("eval", "/r/q.yaml", [], tmp_path / "run", ["run:100", "--task", "aime 24; rm -rf /"], opts, tmp_path)
    assert "PY='/opt/my env/bin/python'" in script.text
    assert """"$PY" -m rlvrx eval run:100 --task 'aime 24; rm -rf /'""" in script.text
    with pytest.raises(UsageError, match="^command 'sft'"):
        build_scripts("sft", "/r/q.yaml", [], tmp_path, [], SlurmOptions(), tmp_path)
    with pytest.raises(UsageError, match="^nodes must be >= 1"):
        build_scripts("train", "/r/q.yaml", [], tmp_path, [], SlurmOptions(nodes=0), tmp_path)
    assert "afterok" not in render_submit([script])


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--partition", "gpu\n#SBATCH --wrap=x", r"--partition: 'gpu\\n#SBATCH --wrap=x' holds a line break"),
        ("--time", "1\n2", r"--time: '1\\n2' holds a line break"),
        ("--sbatch", "qos=high", r"--sbatch 'qos=high': give one sbatch option per --sbatch, e.g. --sbatch=--qos=high$"),
        ("--nodes", "0", r"--nodes must be >= 1, got 0$"),
        ("--shards", "0", r"--shards must be >= 1, got 0$"),
        ("--command", "sft", r"--command 'sft': use one of train, rl-extra, eval, linearity$"),
        ("--out", "a\\b", r"the log directory \(--out, default output.dir/slurm\): .* holds a backslash"),
    ],
)
def test_the_cli_names_the_flag_of_a_bad_value(flag, value, message, tmp_path):
    """The library names its parameters (above); `rlvrx slurm` names the flag that set them, in one line."""
    from clirun import run_cli

    rc, _, err = run_cli("slurm", "quickstart", f"output.dir={tmp_path / 'run'}", "--command", "linearity", flag, value, cwd=tmp_path)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert re.match(r"error: " + message, lines[0]), lines[0]
    assert not (tmp_path / "run").exists()


def test_slurm_environment_is_read_from_slurm_variables():
    assert slurm_env({}) is None and array_shard({}) is None
    env = {
        "SLURM_JOB_ID": "42",
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "8",
        "SLURM_NNODES": "2",
        "SLURM_ARRAY_TASK_ID": "7",
        "SLURM_ARRAY_TASK_COUNT": "4",
        "SLURM_ARRAY_TASK_MIN": "5",
    }
    info = slurm_env(env)
    assert (info["job_id"], info["procid"], info["ntasks"], info["nnodes"]) == ("42", 3, 8, 2)
    assert array_shard(env) == (2, 4)
    assert array_shard({"SLURM_JOB_ID": "1", "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}) == (0, 2)
