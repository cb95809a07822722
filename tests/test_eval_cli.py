"""`rlvrx eval`: the table, the --json shape, several models, --generations, resume after kill -9, errors."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clirun import run_cli
from rlvrx.generation.generations import generation_record, write_generations
from rlvrx.verify.metrics import maj_at_k, pass_at_k


def cli(*args) -> tuple[int, str, str]:
    """`rlvrx eval ARGS...` in-process: (exit code, stdout, stderr)."""
    return run_cli("eval", *args)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def recomputed(records: list[dict], ks) -> dict:
    """The summary metrics, straight from the per-sample verdicts with rlvrx.verify.metrics."""
    out = {"avg": np.mean([np.mean(r["correct"]) for r in records])}
    for k in ks:
        out[f"pass@{k}"] = np.mean([pass_at_k(len(r["correct"]), sum(r["correct"]), k) for r in records])
        out[f"maj@{k}"] = np.mean([maj_at_k(r["answer_key"], r["correct"], k) for r in records])
    return out


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tiny_model_kwargs):
    from rlvrx.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("models")
    return [save_tiny_model(root / f"m{seed}", **{**tiny_model_kwargs, "seed": seed}) for seed in (0, 1)]


def test_eval_arithmetic_cpu_defaults_table_json_and_result_lines(tiny_model_dir, tmp_path):
    summary_path = tmp_path / "summary.json"
    code, out, err = cli(tiny_model_dir, "--task", "arithmetic", "--limit", "6", "--out", tmp_path / "eval", "--no-progress", "--json", summary_path)
    assert code == 0, err
    summary = json.loads(summary_path.read_text())
    assert list(summary) == ["model"] and list(summary["model"]) == ["arithmetic"]
    metrics = summary["model"]["arithmetic"]
    assert {"n", "avg", "pass@1", "pass@4", "maj@4"} <= set(metrics)
    assert metrics["n"] == 4 and metrics["problems"] == 6  # CPU default: 4 samples
    records = lines(tmp_path / "eval" / "model" / "arithmetic.jsonl")
    assert len(records) == 6 and all(len(r["completions"]) == 4 for r in records)
    assert all(n <= 6 for r in records for n in r["num_tokens"])  # arithmetic answer length: 2 * 2 digits + 2
    for key, value in recomputed(records, [1, 4]).items():
        assert metrics[key] == pytest.approx(value)
    assert 0 <= metrics["pass@1"] <= metrics["pass@4"] <= 1
    settings = json.loads((tmp_path / "eval" / "model" / "arithmetic.settings.json").read_text())
    assert settings["sampling"] == {"n": 4, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 6, "seed": 0}
    assert "pass@4 ± stderr" in out and "maj@4 ± stderr" in out and "avg ± stderr" in out
    assert "one standard error over problems" in out
    row = next(line for line in out.splitlines() if "pass@4 ± stderr" in line)
    assert f"{100 * metrics['pass@4']:.1f} ± {100 * metrics['stderr']['pass@4']:.1f}" in row
    assert "CPU defaults" in out and "max 6 new tokens" in out


def test_two_models_and_a_generations_file_give_one_column_each(two_models, tmp_path):
    gens = write_generations(
        tmp_path / "logits.jsonl",
        [
            generation_record("06+63", "06+63=", "69", ["69", "96"]),
            generation_record("00+00", "00+00=", "0", ["0", "0"]),  # not among --ids: left out
            generation_record("63+11", "63+11=", "74", ["47", "74 "]),
        ],
    )
    summary_path = tmp_path / "s.json"
    code, out, err = cli(
        *two_models,
        "--task",
        "arithmetic",
        "--generations",
        gens,
        "--ids",
        "63+11,06+63",
        "-n",
        "2",
        "--k-list",
        "1,2,8",
        "--out",
        tmp_path / "eval",
        "--no-progress",
        "--json",
        summary_path,
    )
    assert code == 0, err
    summary = json.loads(summary_path.read_text())
    assert list(summary) == ["m0", "m1", "logits"]
    header = next(line for line in out.splitlines() if "┃ task" in line)
    assert [name in header for name in ("m0", "m1", "logits")] == [True, True, True]
    assert summary["logits"]["arithmetic"] == {
        "problems": 2,
        "n": 2,
        "avg": 0.5,
        "avg_stderr": 0.0,
        "pass@1": 0.5,
        "pass@2": 1.0,
        "maj@1": 0.5,
        "maj@2": 0.5,
        "stderr": {"avg": 0.0, "pass@1": 0.0, "pass@2": 0.0, "maj@1": 0.5, "maj@2": 0.5},
        "timeouts": 0,
        "errors": 0,
    }
    for model in ("m0", "m1"):
        records = lines(tmp_path / "eval" / model / "arithmetic.jsonl")
        assert [r["id"] for r in records] == ["63+11", "06+63"]
        for key, value in recomputed(records, [1, 2]).items():
            assert summary[model]["arithmetic"][key] == pytest.approx(value)
    assert lines(tmp_path / "eval" / "m0" / "arithmetic.jsonl") != lines(tmp_path / "eval" / "m1" / "arithmetic.jsonl")
    assert "k = 8 exceeds" in err


def test_generations_names_and_task_from_records(tmp_path):
    records = [generation_record("a", "1+1=", "2", ["2", "3", "2"], task="arithmetic"), generation_record("b", "2+2=", "4", ["5", "5", "4"], task="arithmetic")]
    gens = write_generations(tmp_path / "extrapolated_300.jsonl", records)
    code, out, err = cli("--generations", gens, "--out", tmp_path / "eval", "--no-progress", "--json", tmp_path / "a.json")
    assert code == 0, err
    summary = json.loads((tmp_path / "a.json").read_text())
    metrics = summary["extrapolated_300"]["arithmetic"]
    assert metrics["avg"] == pytest.approx(0.5) and metrics["pass@3"] == 1.0
    assert metrics["maj@3"] == pytest.approx(0.5)  # a: "2" wins; b: "5" wins
    graded = lines(tmp_path / "eval" / "extrapolated_300" / "arithmetic.jsonl")
    assert graded[0]["task"] == "arithmetic" and graded[0]["correct"] == [True, False, True]

    code, out, err = cli("--generations", gens, "--name", "logits T=300", "--out", tmp_path / "eval", "--no-progress", "--json", tmp_path / "b.json")
    assert code == 0, err
    assert list(json.loads((tmp_path / "b.json").read_text())) == ["logits T=300"]
    assert (tmp_path / "eval" / "logits-T=300" / "arithmetic.jsonl").is_file()


def _subprocess_env() -> dict:
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    env.pop("RLVRX_DEBUG", None)
    return env


def test_kill_9_then_rerun_loses_no_finished_problem_and_repeats_none(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    results = out / "model" / "arithmetic.jsonl"
    args = [
        sys.executable,
        "-m",
        "rlvrx",
        "eval",
        str(tiny_model_dir),
        "--task",
        "arithmetic",
        "--limit",
        "40",
        "-n",
        "4",
        "--max-new-tokens",
        "30",
        "--batch-size",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_subprocess_env())
    while proc.poll() is None:
        if results.is_file() and results.read_bytes().count(b"\n") >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended (exit {proc.returncode}) before it could be killed: {stderr[-2000:]!r}"
    data = results.read_bytes()
    before = data[: data.rfind(b"\n") + 1]
    finished = before.count(b"\n")
    assert 2 <= finished < 40

    done = subprocess.run(args + ["--json", str(tmp_path / "s.json")], capture_output=True, text=True, env=_subprocess_env())
    assert done.returncode == 0, done.stderr
    after = results.read_bytes()
    assert after.startswith(before)
    from rlvrx.tasks import get_task

    ids = [r["id"] for r in lines(results)]
    assert ids == [e.id for e in get_task("arithmetic").test_examples()[:40]]  # every id exactly once, in order
    assert f"{finished} finished problem(s) reused; {40 - finished} generated and graded" in done.stdout
    summary = json.loads((tmp_path / "s.json").read_text())["model"]["arithmetic"]
    assert summary["problems"] == 40
    for key, value in recomputed(lines(results), [1, 4]).items():
        assert summary[key] == pytest.approx(value)


def one_error_line(err: str) -> str:
    shown = [line for line in err.splitlines() if line.strip()]
    assert len(shown) == 1 and "Traceback" not in err, err
    return shown[0]


@pytest.mark.parametrize(
    "args, message",
    [
        ((), "nothing to evaluate"),
        (("MODEL",), "which task?"),
        (("MODEL", "--task", "arithmetc"), "did you mean 'arithmetic'"),
        (("MODEL", "--task", "arithmetic", "--k-list", "1,x"), "--k-list"),
        (("MODEL", "--task", "arithmetic", "--name", "a", "--name", "b"), "--name was given 2 time(s) for 1"),
        (("MODEL", "MODEL", "--task", "arithmetic"), "give distinct names with --name"),
        (("MODEL", "--task", "arithmetic", "--engine", "tgi"), "unknown engine 'tgi'"),
        (("MODEL", "--task", "math500", "--data-dir", "/nonexistent"), "looked for /nonexistent/math500.jsonl"),
        (("MODEL", "--task", "arithmetic", "--task-option", "digitz=3"), "digitz"),
        (("--generations", "/nonexistent/g.jsonl"), "no such generations file"),
        (("MODEL", "--task", "arithmetic", "--engine", "vllm"), "vllm engine needs"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(tiny_model_dir, tmp_path, args, message):
    if "vllm" in args and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: --engine vllm is not an error")
    args = [str(tiny_model_dir) if a == "MODEL" else a for a in args]
    code, out, err = cli(*args, "--out", tmp_path, "--no-progress")
    assert code == 2, (out, err)
    assert message in one_error_line(err)
    assert not list(tmp_path.rglob("*.jsonl"))  # refused before any work


def test_report_eval_table_shows_standard_errors():
    from rlvrx.render.html import summary_tables
    from rlvrx.verify.metrics import ProblemOutcome, summarize_tasks

    problems = [ProblemOutcome("a", [True, False]), ProblemOutcome("b", [True, True]), ProblemOutcome("c", [False, False])]
    metrics = summarize_tasks({"arithmetic": problems}, k_list=[1, 2])
    ((title, header, rows),) = summary_tables({"stages": {"eval": {"base": metrics}}})
    assert title == "eval: arithmetic (± one standard error over problems)" and header == ["metric", "base"]
    cells = dict((row[0], row[1]) for row in rows)
    # avg = pass@1 = (0.5 + 1 + 0) / 3, sd 0.5 -> stderr 0.5 / sqrt(3); pass@2 = (1 + 1 + 0) / 3, sd 1/sqrt(3) -> 1/3
    assert cells["avg ± stderr"] == cells["pass@1 ± stderr"] == "0.500 ± 0.289"
    assert cells["pass@2 ± stderr"] == "0.667 ± 0.333"
    assert cells["n"] == "2"
