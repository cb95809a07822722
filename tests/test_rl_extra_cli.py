"""`rlvrx rl-extra RECIPE --baseline` and `rlvrx rl-extra compare` on the tiny model, checked against
the run directories' own files (recipe.yaml, metrics.jsonl) read directly."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml

from clirun import run_cli
from conftest import TINY_TASK

M, N, ITERATIONS = 2, 3, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sft_model):
    """An RL-Extra run and its --baseline run, made by the CLI; returns (rl_extra_dir, baseline_dir, summary_json)."""
    root = tmp_path_factory.mktemp("rlx")
    recipe = {
        "model": {"path": str(sft_model)},
        "task": dict(TINY_TASK),
        "sft": {"enabled": False},
        "grpo": {"num_generations": 4, "batch_size": 4, "lr": 1e-3, "steps": 6, "save_every": 1, "eval_every": 1, "max_new_tokens": 3, "eval_examples": 12},
        "rl_extra": {"m": M, "n": N, "iterations": ITERATIONS},
        "output": {"dir": str(root / "rx")},
    }
    (root / "rx.yaml").write_text(yaml.safe_dump(recipe))
    summary = root / "summary.json"
    code, out, err = run_cli("rl-extra", root / "rx.yaml", "--baseline", "--no-progress", "--json", summary, "--png", root / "baseline.png")
    assert code == 0, out + err
    assert (root / "baseline.png").stat().st_size > 0
    return root / "rx", root / "rx-baseline", json.loads(summary.read_text())


def eval_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "test_accuracy" in r]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_baseline_is_plain_grpo_with_the_same_recipe_and_gradient_budget(runs):
    rx, base, summary = runs
    rx_recipe = yaml.safe_load((rx / "recipe.yaml").read_text())
    base_recipe = yaml.safe_load((base / "recipe.yaml").read_text())
    expected = json.loads(json.dumps(rx_recipe))
    rl_extra = expected.pop("rl_extra")
    assert (rl_extra["m"], rl_extra["n"], rl_extra["iterations"]) == (M, N, ITERATIONS)
    expected["grpo"]["steps"] = M * ITERATIONS
    expected["output"]["dir"] = str(rx) + "-baseline"
    assert base_recipe.pop("rl_extra", None) is None
    assert base_recipe == expected
    # Both spent the same number of gradient steps; only RL-Extra jumped ahead.
    assert summary["RL-Extra"]["grad_steps"] == summary["GRPO baseline"]["grad_steps"] == M * ITERATIONS
    assert summary["RL-Extra"]["steps"] == ITERATIONS * (M + N) and summary["GRPO baseline"]["steps"] == M * ITERATIONS
    base_rows = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert not any(r.get("stage") == "jump" for r in base_rows)
    assert max(r["grad_step"] for r in base_rows if "grad_step" in r) == M * ITERATIONS


@pytest.mark.slow
def test_compare_reports_accuracy_at_equal_gradient_steps_from_the_metrics(runs, tmp_path):
    rx, base, _ = runs
    out_json, out_png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    code, out, err = run_cli("rl-extra", "compare", rx, base, "--json", out_json, "--png", out_png)
    assert code == 0, out + err
    result = json.loads(out_json.read_text())
    a, b = eval_rows(rx), eval_rows(base)
    assert a and b

    def reached(rows, key, value):  # the accuracy of the last evaluation at or before `value`
        hits = [r["test_accuracy"] for r in rows if r[key] <= value + 1e-9]
        return hits[-1] if hits else None

    grad_steps = sorted({r["grad_step"] for r in a} | {r["grad_step"] for r in b})
    assert grad_steps == list(range(M * ITERATIONS + 1))  # eval_every=1: every gradient step was evaluated
    assert result["by_grad_step"] == [{"grad_step": g, "a": reached(a, "grad_step", g), "b": reached(b, "grad_step", g)} for g in grad_steps]
    budget = min(max(r["elapsed"] for r in a), max(r["elapsed"] for r in b))
    assert [row["elapsed"] for row in result["by_wall_time"]] == pytest.approx([budget / 4, budget / 2, 3 * budget / 4, budget])
    for row in result["by_wall_time"]:
        assert row["a"] == reached(a, "elapsed", row["elapsed"]) and row["b"] == reached(b, "elapsed", row["elapsed"])
    assert result["final"]["a"]["test_accuracy"] == a[-1]["test_accuracy"] and result["final"]["a"]["step"] == ITERATIONS * (M + N)
    assert result["final"]["b"]["test_accuracy"] == b[-1]["test_accuracy"] and result["final"]["b"]["step"] == M * ITERATIONS
    assert "curves" not in result
    assert png_size(out_png) == (1100, 440)  # 10 x 4 inches at 110 dpi
    assert "greedy test accuracy at equal gradient steps" in " ".join(out.split()) and "plot:" in out


@pytest.mark.slow
def test_compare_default_png_goes_into_the_first_run(runs):
    rx, base, _ = runs
    (rx / "compare.png").unlink(missing_ok=True)
    code, out, err = run_cli("rl-extra", "compare", rx, base)
    assert code == 0, out + err
    assert png_size(rx / "compare.png")[0] > 0


@pytest.mark.parametrize("args", [["compare"], ["compare", "a"], ["compare", "a", "b", "c"]])
def test_compare_usage_errors(args):
    code, out, err = run_cli("rl-extra", *args)
    assert code == 2
    assert "usage: rlvrx rl-extra compare RUN_A RUN_B" in err and "Traceback" not in err


def test_compare_of_a_directory_without_metrics_is_a_usage_error(tmp_path):
    code, out, err = run_cli("rl-extra", "compare", tmp_path, tmp_path / "other")
    assert code == 2
    assert "no metrics" in err and str(tmp_path) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
