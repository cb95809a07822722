"""rlvrx.rundir.RunDir: the paths of a run directory, and the one reader and writer of metrics.jsonl."""

from __future__ import annotations

import pytest

from rlvrx.errors import UsageError
from rlvrx.rundir import RunDir


def test_paths(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.recipe == tmp_path / "r/recipe.yaml" and run.trajectory == tmp_path / "r/trajectory.json"
    assert run.checkpoint(40) == tmp_path / "r/checkpoints/step_000040"
    assert run.stage_summary("eval") == tmp_path / "r/stages/eval.json" and run.stage_marker("eval") == tmp_path / "r/stages/eval.done"
    assert run.linearity_summary("logprobs") == tmp_path / "r/linearity/logprobs/summary.json"
    assert run.linearity_parts_json("weights") == tmp_path / "r/linearity/weights.json"
    assert (run.eval, run.report, run.extrapolated, run.compare_png) == (
        tmp_path / "r/eval",
        tmp_path / "r/report",
        tmp_path / "r/extrapolated",
        tmp_path / "r/compare.png",
    )
    with pytest.raises(ValueError, match="kind must be one of weights, logprobs"):
        run.linearity("logits")


def test_metrics_append_read_truncate_and_a_torn_tail(tmp_path):
    run = RunDir(tmp_path)
    assert run.read_metrics() == []
    for step in range(4):
        run.append_metrics({"stage": "grpo", "step": step, "reward_mean": step / 4})
    with open(run.metrics, "a") as f:
        f.write('{"stage": "grpo", "st')  # a process killed mid-append
    assert [r["step"] for r in run.read_metrics()] == [0, 1, 2, 3]
    run.truncate_metrics(after_step=1)
    assert run.metrics.read_text().count("\n") == 2 and [r["step"] for r in run.read_metrics()] == [0, 1]
    run.clear_metrics()
    assert not run.metrics.exists() and run.read_metrics() == []


def test_a_damaged_metrics_line_is_one_error_naming_file_and_line(tmp_path):
    run = RunDir(tmp_path)
    run.append_metrics({"step": 0})
    run.append_metrics({"step": 1, "reward_mean": "high"})
    run.append_metrics({"step": 2})
    with pytest.raises(UsageError, match=r"metrics\.jsonl:2: reward_mean must be a number, found 'high'"):
        run.read_metrics()
