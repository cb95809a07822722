"""Eval robustness (issue 17, eval part), with real processes and real checkpoint dirs:

- a data file never names code to import (a generations file's "task" field);
- results are keyed by the model's sha256 and go inside the run that owns the checkpoint;
- one eval writes an output at a time (a real second process is refused, naming the holder's pid);
- --overwrite replaces old results only once the new ones are complete;
- a resume after SIGKILL mid-batch writes exactly the records of an uninterrupted run;
- one-line errors for bad weights, data files, timeouts, devices and task names.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clirun import run_cli
from rlvrx.generation.generations import generation_record, write_generations

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds: only so that a hung child fails the test instead of hanging it


rlvrx = run_cli  # (exit code, stdout, stderr) of `rlvrx ARGS` in this process


def one_error_line(err: str) -> str:
    shown = [line for line in err.splitlines() if line.strip()]
    assert len(shown) == 1 and "Traceback" not in err, err
    return shown[0]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def env(**extra) -> dict:
    out = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", **extra}
    out.pop("RLVRX_DEBUG", None)
    return out


def eval_cmd(model, out, *args) -> list[str]:
    return [sys.executable, "-m", "rlvrx", "eval", str(model), "--task", "arithmetic", "--out", str(out), "--no-progress", *map(str, args)]


def wait_for_lines(path: Path, proc: subprocess.Popen, count: int) -> None:
    """Poll until `path` holds `count` complete lines (the process must still be running)."""
    deadline = time.monotonic() + TIMEOUT
    while not (path.is_file() and path.read_bytes().count(b"\n") >= count):
        assert proc.poll() is None, f"the eval ended (exit {proc.returncode}) before it wrote {count} line(s): {proc.stderr.read()[-2000:]!r}"
        assert time.monotonic() < deadline, "the eval wrote nothing"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_kwargs) -> list[Path]:
    """Three tiny models that differ only in their random init."""
    from rlvrx.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("models")
    return [save_tiny_model(root / f"m{seed}", **{**tiny_model_kwargs, "seed": seed}) for seed in (0, 1, 2)]


# ------------------------------------------------------------------------------ 1. no code from data


PROBE = """\
from pathlib import Path
Path({marker!r}).write_text("imported")

def make():
    from rlvrx.tasks import ArithmeticTask
    return ArithmeticTask()
"""


@pytest.mark.parametrize("named", ["rlvrx_probe_task:make", "os:system"])
def test_a_generations_file_cannot_name_code_to_import(tmp_path, named):
    marker = tmp_path / "imported.txt"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "rlvrx_probe_task.py").write_text(PROBE.format(marker=str(marker)))
    gens = write_generations(tmp_path / "gens.jsonl", [generation_record("a", "1+1=", "2", ["2", "3"], task=named)])
    child_env = env(PYTHONPATH=str(tmp_path / "mods"))
    base = [sys.executable, "-m", "rlvrx", "eval", "--generations", str(gens), "--no-progress"]

    refused = subprocess.run(base + ["--out", str(tmp_path / "o1")], capture_output=True, text=True, env=child_env, timeout=TIMEOUT)
    assert refused.returncode == 2, refused.stderr
    line = one_error_line(refused.stderr)
    assert f"task '{named}', which is not a registered task" in line and "--task" in line
    assert not marker.exists()
    assert not (tmp_path / "o1").exists()

    # The same module given on the command line is the user's own choice: it is imported and grades.
    chosen = subprocess.run(
        base + ["--task", "rlvrx_probe_task:make", "--out", str(tmp_path / "o2")], capture_output=True, text=True, env=child_env, timeout=TIMEOUT
    )
    assert chosen.returncode == 0, chosen.stderr
    assert marker.read_text() == "imported"
    assert lines(tmp_path / "o2" / "gens" / "arithmetic.jsonl")[0]["correct"] == [True, False]


# ----------------------------------------------------------------- 2. results keyed by the model's sha256


def make_run(root: Path, base_model: Path, extrapolated: Path) -> Path:
    """A run directory: step 0 registered in trajectory.json, and an unregistered extrapolated/step_000024."""
    from rlvrx.trajectory import Trajectory

    shutil.copytree(base_model, root / "checkpoints" / "step_000000")
    trajectory = Trajectory.load(root, create=True)
    trajectory.add(0, root / "checkpoints" / "step_000000", kind="base", hash=False)
    trajectory.save()
    shutil.copytree(extrapolated, root / "extrapolated" / "step_000024")
    return root


def test_same_step_of_two_runs_never_shares_results(models, tmp_path):
    from rlvrx.io.identity import checkpoint_sha256

    run_a = make_run(tmp_path / "runs" / "a", models[0], models[1])
    run_b = make_run(tmp_path / "runs" / "b", models[0], models[2])
    work = tmp_path / "work"
    work.mkdir()
    for run in (run_a, run_b):
        code, out, err = rlvrx("eval", run / "extrapolated" / "step_000024", "--task", "arithmetic", "--limit", "3", "-n", "2", "--no-progress", cwd=work)
        assert code == 0, err
        assert "reused" not in out
        result = run / "eval" / "extrapolated-step_000024" / "arithmetic.jsonl"
        assert len(lines(result)) == 3
        settings = json.loads(result.with_name("arithmetic.settings.json").read_text())
        assert settings["model_sha256"] == checkpoint_sha256(run / "extrapolated" / "step_000024")
    assert not (work / "eval").exists()  # nothing in the current directory
    assert lines(run_a / "eval/extrapolated-step_000024/arithmetic.jsonl") != lines(run_b / "eval/extrapolated-step_000024/arithmetic.jsonl")

    # A shared --out with the same --name: the second model is refused, not resumed from the first's results.
    shared = tmp_path / "shared"
    common = ["--task", "arithmetic", "--limit", "3", "-n", "2", "--no-progress", "--out", shared, "--name", "x"]
    assert rlvrx("eval", run_a / "extrapolated" / "step_000024", *common)[0] == 0
    before = (shared / "x" / "arithmetic.jsonl").read_bytes()
    code, out, err = rlvrx("eval", run_b / "extrapolated" / "step_000024", *common)
    assert code == 2
    line = one_error_line(err)
    assert "holds results of another model (sha256" in line and "--overwrite" in line
    assert (shared / "x" / "arithmetic.jsonl").read_bytes() == before

    # The same path re-extrapolated (new weights): refused too; --overwrite evaluates the new model.
    shutil.rmtree(run_a / "extrapolated" / "step_000024")
    shutil.copytree(models[2], run_a / "extrapolated" / "step_000024")
    code, out, err = rlvrx("eval", run_a / "extrapolated" / "step_000024", "--task", "arithmetic", "--limit", "3", "-n", "2", "--no-progress", cwd=work)
    assert code == 2 and "another model" in one_error_line(err)
    code, out, err = rlvrx(
        "eval", run_a / "extrapolated" / "step_000024", "--task", "arithmetic", "--limit", "3", "-n", "2", "--no-progress", "--overwrite", cwd=work
    )
    assert code == 0, err
    assert lines(run_a / "eval/extrapolated-step_000024/arithmetic.jsonl") == lines(run_b / "eval/extrapolated-step_000024/arithmetic.jsonl")


def test_rlvrx_run_writes_eval_results_into_the_run(models, tmp_path):
    """`rlvrx run` with an eval stage of a registered step, an extrapolated checkpoint of the run and a
    model outside it: every result lands in RUN/eval, nothing in the current directory."""
    from rlvrx.cli.pipeline import run_pipeline

    run = make_run(tmp_path / "runs" / "r", models[0], models[1])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{path: {models[0]}}}\n"
        f"output: {{dir: {run}}}\n"
        "stages:\n"
        "  - kind: eval\n"
        f"    args: ['{{run}}:0', '{{run}}/extrapolated/step_000024', '{models[2]}']\n"
        "    options: {task: arithmetic, limit: 2, samples: 1}\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    here = os.getcwd()
    os.chdir(work)
    try:
        results = run_pipeline(recipe, echo=lambda line: None)
    finally:
        os.chdir(here)
    assert [r["status"] for r in results] == ["done"]
    for folder in ("step_000000", "extrapolated-step_000024", "m2"):
        assert len(lines(run / "eval" / folder / "arithmetic.jsonl")) == 2
    assert list(work.iterdir()) == []


def test_recipe_validate_names_unknown_tasks(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {tiny: {layers: 1}}\ntask: {name: arithmetc}\nstages:\n  - kind: eval\n    options: {task: 'math500,gsm8kk'}\n")
    code, out, err = rlvrx("recipe", "validate", recipe)
    assert code == 2
    assert "task.name: unknown task 'arithmetc'; did you mean 'arithmetic'? known tasks: aime24, aime25, arithmetic, gsm8k, math, math500" in err
    # The stage options are checked once the recipe's sections are valid.
    recipe.write_text(recipe.read_text().replace("arithmetc", "my_pkg.tasks:make"))  # a dotted task: the recipe's own choice
    code, out, err = rlvrx("recipe", "validate", recipe)
    assert code == 2
    assert "stages[0] (eval).options.task: unknown task 'gsm8kk'; did you mean 'gsm8k'?" in err
    assert "unknown task 'math500'" not in err and "my_pkg" not in err


# ------------------------------------------------------------------------------------ 3. one writer


def test_a_second_eval_of_the_same_output_is_refused_while_the_first_writes(models, tmp_path):
    out = tmp_path / "eval"
    results = out / "m0" / "arithmetic.jsonl"
    first = subprocess.Popen(
        eval_cmd(models[0], out, "--limit", "60", "-n", "2", "--batch-size", "1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )
    try:
        wait_for_lines(results, first, 1)
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run, the lock taken, whatever the machine's speed
        try:
            for seed in ("1", "0"):
                second = subprocess.run(
                    eval_cmd(models[0], out, "--limit", "60", "-n", "2", "--seed", seed), capture_output=True, text=True, env=env(), timeout=TIMEOUT
                )
                assert second.returncode == 1, second.stderr
                line = one_error_line(second.stderr)
                assert f"in use by pid {first.pid}" in line and str(results) in line
        finally:
            os.kill(first.pid, signal.SIGCONT)
        _, stderr = first.communicate(timeout=TIMEOUT)
        assert first.returncode == 0, stderr
    finally:
        if first.poll() is None:
            first.kill()
    from rlvrx.tasks import get_task

    assert [r["id"] for r in lines(results)] == [e.id for e in get_task("arithmetic").test_examples()[:60]]
    # Once it is done, another seed is refused by the settings check, not mixed in.
    later = subprocess.run(eval_cmd(models[0], out, "--limit", "60", "-n", "2", "--seed", "1"), capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert later.returncode == 2 and "holds results made with sampling" in one_error_line(later.stderr)


# ------------------------------------------------------------------------------------ 4. --overwrite


@pytest.mark.slow
def test_overwrite_keeps_the_old_results_until_the_new_ones_are_complete(models, tmp_path):
    out = tmp_path / "eval"
    folder = out / "m0"
    args = ("--limit", "24", "-n", "2", "--batch-size", "1")
    assert subprocess.run(eval_cmd(models[0], out, *args), capture_output=True, env=env(), timeout=TIMEOUT).returncode == 0
    old = {name: (folder / name).read_bytes() for name in ("arithmetic.jsonl", "arithmetic.settings.json")}

    killed = subprocess.Popen(
        eval_cmd(models[0], out, *args, "--seed", "1", "--overwrite"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()
    )
    try:
        wait_for_lines(folder / ".arithmetic.overwrite" / "arithmetic.jsonl", killed, 2)
        assert {name: (folder / name).read_bytes() for name in old} == old  # still there while the new ones are written
        os.kill(killed.pid, signal.SIGKILL)
        killed.communicate(timeout=TIMEOUT)
    finally:
        if killed.poll() is None:
            killed.kill()
    assert killed.returncode == -signal.SIGKILL
    assert {name: (folder / name).read_bytes() for name in old} == old

    resumed = subprocess.run(eval_cmd(models[0], out, *args), capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert resumed.returncode == 0 and "24 finished problem(s) reused" in resumed.stdout
    assert {name: (folder / name).read_bytes() for name in old} == old
    assert not (folder / ".arithmetic.overwrite").exists()  # the unfinished overwrite was dropped

    done = subprocess.run(eval_cmd(models[0], out, *args, "--seed", "1", "--overwrite"), capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    fresh = subprocess.run(eval_cmd(models[0], tmp_path / "fresh", *args, "--seed", "1"), capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert fresh.returncode == 0, fresh.stderr
    assert lines(folder / "arithmetic.jsonl") == lines(tmp_path / "fresh" / "m0" / "arithmetic.jsonl")
    assert lines(folder / "arithmetic.jsonl") != [json.loads(x) for x in old["arithmetic.jsonl"].splitlines()]
    assert json.loads((folder / "arithmetic.settings.json").read_text())["sampling"]["seed"] == 1
    assert sorted(p.name for p in folder.iterdir()) == [".arithmetic.lock", "arithmetic.jsonl", "arithmetic.settings.json"]


def test_a_swap_cut_short_after_completion_is_finished_by_the_next_open(tmp_path):
    """The state a kill between the two renames of a completed overwrite leaves (new settings in
    place, the new results still staged with the COMPLETE mark) is rolled forward under the lock."""
    from rlvrx.eval.output import EvalOutput

    folder = tmp_path / "m"
    old_record = generation_record("a", "1+1=", "2", ["3"], correct=[False], extracted=["3"], answer_key=["3"], status=["ok"], error=[None])
    new_record = dict(old_record, completions=["2"], correct=[True], extracted=["2"], answer_key=["2"])
    output = EvalOutput(folder, "arithmetic").open()
    output.append(old_record)
    output.commit()
    output.close()
    (folder / "arithmetic.settings.json").write_text('{"sampling": "old"}')

    staging = folder / ".arithmetic.overwrite"
    staging.mkdir()
    (staging / "arithmetic.jsonl").write_text(json.dumps(new_record) + "\n")
    (staging / "COMPLETE").write_text("")
    (folder / "arithmetic.settings.json").write_text('{"sampling": "new"}')  # renamed first, then the kill

    output = EvalOutput(folder, "arithmetic").open()
    try:
        assert output.finished == {"a": new_record}
    finally:
        output.close()
    assert not staging.exists()
    assert lines(folder / "arithmetic.jsonl") == [new_record]

    # Without the mark the staged results are an unfinished overwrite: dropped, the old ones kept.
    staging.mkdir()
    (staging / "arithmetic.jsonl").write_text(json.dumps(old_record) + "\n")
    output = EvalOutput(folder, "arithmetic").open()
    output.close()
    assert not staging.exists() and lines(folder / "arithmetic.jsonl") == [new_record]


# ------------------------------------------------------------------------ 5. resume after SIGKILL


@pytest.mark.slow
def test_resume_after_sigkill_mid_batch_gives_the_uninterrupted_records(models, tmp_path):
    args = ("--limit", "40", "-n", "4", "--batch-size", "4", "--temperature", "1.0", "--seed", "7")
    whole = subprocess.run(eval_cmd(models[0], tmp_path / "whole", *args), capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert whole.returncode == 0, whole.stderr
    reference = lines(tmp_path / "whole" / "m0" / "arithmetic.jsonl")
    assert len(reference) == 40 and len({tuple(r["completions"]) for r in reference}) > 1

    results = tmp_path / "cut" / "m0" / "arithmetic.jsonl"
    proc = subprocess.Popen(eval_cmd(models[0], tmp_path / "cut", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        wait_for_lines(results, proc, 5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    data = results.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    finished = complete.count(b"\n")
    assert 5 <= finished < 40
    if finished % 4 == 0:
        # The kill fell between two batches' records. Records are appended one at a time, so the file
        # held one line fewer a moment earlier: go back to that state, so the resume starts mid-batch.
        with open(results, "r+b") as handle:
            handle.truncate(complete[:-1].rfind(b"\n") + 1)
        finished -= 1

    resumed = subprocess.run(eval_cmd(models[0], tmp_path / "cut", *args), capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{finished} finished problem(s) reused; {40 - finished} generated and graded" in resumed.stdout
    assert lines(results) == reference


# ----------------------------------------------------------------------------- 6. one-line errors


def zero_bytes(model: Path) -> None:
    (model / "model.safetensors").write_bytes(b"")


def garbage(model: Path) -> None:
    (model / "model.safetensors").write_bytes(b"\x93NUMPY not a safetensors file" * 40)


def bin_only(model: Path) -> None:
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a torch file")


@pytest.mark.parametrize(
    "damage, message",
    [
        (zero_bytes, "model.safetensors: corrupt or truncated safetensors file (shorter than a header)"),
        (garbage, "model.safetensors: corrupt or truncated safetensors file (header of"),
        (bin_only, "holds only .bin/.pt weights; rlvrx reads safetensors"),
    ],
)
def test_damaged_weights_are_one_line_naming_the_file(tiny_model_dir, tmp_path, damage, message):
    model = shutil.copytree(tiny_model_dir, tmp_path / "bad")
    damage(model)
    code, out, err = rlvrx("eval", model, "--task", "arithmetic", "--limit", "2", "--out", tmp_path / "o", "--no-progress")
    assert code == 1
    line = one_error_line(err)
    assert str(model) in line and message in line
    assert not (tmp_path / "o").exists()
    if damage is not bin_only:  # extrapolate logits reads the same files
        for pair in (("--base-path", model, "--second-path", tiny_model_dir), ("--base-path", tiny_model_dir, "--second-path", model)):
            code, out, err = rlvrx("extrapolate", "logits", *pair, "--alpha", "2", "--task", "arithmetic", "--out", tmp_path / "l.jsonl")
            assert code == 1
            line = one_error_line(err)
            assert str(model / "model.safetensors") in line and message in line
        assert not (tmp_path / "l.jsonl").exists()


def deep_json(depth: int = 100_000) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"problem": "1+1", "answer": "2"}\n{"problem": "\xff\xfe", "answer": "1"}\n', "not UTF-8 text (byte"),
        (deep_json().encode() + b"\n", ":1: invalid JSON: nested too deeply"),
        (b"", "no rows; expected one JSON object per line"),
        (b"\n\n", "no rows; expected one JSON object per line"),
    ],
    ids=["non-utf8", "deep", "empty", "blank"],
)
def test_bad_data_files_are_one_line(tiny_model_dir, tmp_path, content, message):
    data = tmp_path / "problems.jsonl"
    data.write_bytes(content)
    code, out, err = rlvrx("eval", tiny_model_dir, "--data", data, "--limit", "2", "--out", tmp_path / "o", "--no-progress")
    assert code == 2
    line = one_error_line(err)
    assert str(data) in line and message in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"id": "a", "prompt": "p", "gold": "\xff", "completions": ["1"]}\n', "not UTF-8 text (byte"),
        (deep_json().encode() + b"\n", ":1: invalid JSON: nested too deeply"),
    ],
    ids=["non-utf8", "deep"],
)
def test_bad_generations_files_are_one_line(tmp_path, content, message):
    gens = tmp_path / "gens.jsonl"
    gens.write_bytes(content)
    for task in ((), ("--task", "arithmetic")):
        code, out, err = rlvrx("eval", "--generations", gens, *task, "--out", tmp_path / "o", "--no-progress")
        assert code == 2
        line = one_error_line(err)
        assert str(gens) in line and message in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-1"])
def test_grading_timeout_must_be_positive_and_finite(tiny_model_dir, tmp_path, value):
    code, out, err = rlvrx("eval", tiny_model_dir, "--task", "arithmetic", "--limit", "2", "--grading-timeout", value, "--out", tmp_path / "o", "--no-progress")
    assert code == 2
    assert "grading-timeout must be a positive, finite number of seconds" in one_error_line(err)
    assert not (tmp_path / "o").exists()


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="asks for a CUDA device this machine must lack")
def test_devices_this_machine_lacks_are_one_line(tiny_model_dir, tmp_path):
    cases = [
        (
            ("eval", tiny_model_dir, "--task", "arithmetic", "--limit", "2", "--out", tmp_path / "o", "--no-progress"),
            "--device cuda: no CUDA device is visible; use --device cpu",
            "cuda",
        ),
        (("eval", tiny_model_dir, "--task", "arithmetic", "--limit", "2", "--out", tmp_path / "o", "--no-progress"), "--device gpu: not a torch device", "gpu"),
        (
            (
                "extrapolate",
                "logits",
                "--base-path",
                tiny_model_dir,
                "--second-path",
                tiny_model_dir,
                "--alpha",
                "2",
                "--task",
                "arithmetic",
                "--out",
                tmp_path / "l.jsonl",
            ),
            "--device cuda:1: no CUDA device is visible",
            "cuda:1",
        ),
    ]
    for args, message, device in cases:
        code, out, err = rlvrx(*args, "--device", device)
        assert code == 2
        assert message in one_error_line(err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "l.jsonl").exists()
