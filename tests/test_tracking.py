"""Trackers of a native run (--logger / the recipe's logger key), read back with the real libraries."""

import json

import pytest
from clirun import run_cli

from rlvrx.train.tracking import VERL_NAMES, tracker_metrics, tracker_step

RECIPE = """\
model: {tiny: {layers: 1, hidden: 32, heads: 2, kv_heads: 1, intermediate: 64, max_position: 32}}
task: {name: arithmetic, digits: 1, n_train: 40, n_test: 8}
sft: {steps: 2, batch_size: 4}
grpo: {num_generations: 4, batch_size: 4, lr: 1.0e-3, steps: 3, save_every: 3, eval_every: 3, max_new_tokens: 3, eval_examples: 8}
output: {dir: RUN}
"""


def test_tracker_metrics_use_verl_names():
    record = {
        "stage": "grpo",
        "step": 7,
        "grad_step": 5,
        "reward_mean": 0.25,
        "loss": -0.5,
        "kl": 0.01,
        "entropy": 1.5,
        "grad_norm": 2.0,
        "clip_fraction": 0.1,
        "response_length": 3.0,
        "step_time": 0.2,
        "test_accuracy": 0.75,
        "odd": float("nan"),
        "flag": True,
        "new_key": 4,
    }
    assert tracker_metrics(record, "arithmetic") == {
        "training/global_step": 7.0,
        "training/grad_step": 5.0,
        "critic/score/mean": 0.25,
        "actor/pg_loss": -0.5,
        "actor/kl_loss": 0.01,
        "actor/entropy": 1.5,
        "actor/grad_norm": 2.0,
        "actor/pg_clipfrac": 0.1,
        "response_length/mean": 3.0,
        "perf/time_per_step": 0.2,
        "val-core/arithmetic/acc/mean@1": 0.75,
        "rlvrx/new_key": 4.0,
    }
    sft = {"stage": "sft", "step": 0, "sft_step": 12, "loss": 1.25}
    assert tracker_metrics(sft, "arithmetic") == {"sft/loss": 1.25} and tracker_step(sft) == 12


def test_tensorboard_tracker_writes_each_record_at_its_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlvrx.train.tracking import Tracker

    records = [{"stage": "grpo", "step": s, "grad_step": g, "reward_mean": 0.1 * s, "loss": -0.5 + s} for s, g in [(1, 1), (2, 2), (6, 2)]]
    tracker = Tracker(["console", "tensorboard"], tmp_path, project="p", run_name="r", task="arithmetic")
    for record in records:
        tracker.log(record)
    tracker.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["actor/pg_loss", "critic/score/mean", "training/global_step", "training/grad_step"]
    assert [(e.step, e.value) for e in events.Scalars("training/grad_step")] == [(1, 1.0), (2, 2.0), (6, 2.0)]  # RL-Extra: both counters
    assert [(e.step, e.value) for e in events.Scalars("critic/score/mean")] == [(s, pytest.approx(0.1 * s)) for s in (1, 2, 6)]


def test_a_missing_tracker_library_names_the_extra(tmp_path, monkeypatch):
    import sys

    from rlvrx.errors import UsageError
    from rlvrx.train.tracking import Tracker

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(UsageError, match=r"logger needs mlflow: pip install 'rlvrx\[tracking\]'"):
        Tracker(["mlflow"], tmp_path, project="p", run_name="r", task="t")


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One 3-step tiny run with --logger tensorboard,mlflow (the tests below only read it, or resume it at its end)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    tmp_path = tmp_path_factory.mktemp("tracked")
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("RUN", str(run)))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        code, out, err = run_cli("train", recipe, "--logger", "tensorboard,mlflow", "--no-progress")
    assert code == 0, out + err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, recipe, records


@pytest.mark.slow
def test_tensorboard_and_mlflow_hold_the_metrics_jsonl_values(tracked_run):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, records = tracked_run
    steps = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    sft = [r for r in records if r.get("stage") == "sft"]
    assert [r["sft_step"] for r in sft] == [1, 2]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("reward_mean", "loss", "entropy", "grad_norm", "response_length"):
        scalars = events.Scalars(VERL_NAMES[key])
        assert [s.step for s in scalars] == [1, 2, 3]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in steps], rel=1e-6, abs=1e-7)
    assert [(s.step, s.value) for s in events.Scalars("sft/loss")] == [(r["sft_step"], pytest.approx(r["loss"])) for r in sft]
    evals = events.Scalars("val-core/arithmetic/acc/mean@1")
    assert [(s.step, s.value) for s in evals] == [(r["step"], pytest.approx(r["test_accuracy"])) for r in records if "test_accuracy" in r]

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "rlvrx"]
    [mlrun] = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == "run" and mlrun.info.status == "FINISHED"
    assert {"critic/score/mean", "actor/pg_loss", "actor/entropy", "actor/grad_norm", "val-core/arithmetic/acc/mean_at_1"} <= set(
        mlrun.data.metrics
    )  # '@' written as '_at_', as verl's mlflow adapter does
    history = client.get_metric_history(mlrun.info.run_id, "actor/pg_loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], pytest.approx(r["loss"])) for r in steps]


@pytest.mark.slow
def test_a_rerun_with_other_loggers_resumes_and_bad_names_are_one_line(tracked_run):
    run, recipe, records = tracked_run
    code, out, err = run_cli("train", recipe, "--no-progress")  # logger back to [console]: not a different recipe
    assert code == 0, out + err
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] == records
    code, out, err = run_cli("train", recipe, "--logger", "tensorboard,neptune")
    assert code == 2
    assert "--logger 'tensorboard,neptune': expected comma-separated names from console, tensorboard, mlflow" in out + err
