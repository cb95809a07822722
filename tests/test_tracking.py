"""Trackers of a native run (--logger / the recipe's logger key), read back with the real libraries."""

import json
import shutil

import pytest
from clirun import run_cli
from trackerread import trackio_rows, wandb_run

from rlvrx.train.tracking import VERL_NAMES, summary_metrics, tracker_metrics, tracker_step

RECIPE = """\
model: {tiny: {layers: 1, hidden: 32, heads: 2, kv_heads: 1, intermediate: 64, max_position: 32}}
task: {name: arithmetic, digits: 1, n_train: 40, n_test: 8}
sft: {steps: 2, batch_size: 4}
grpo: {num_generations: 4, batch_size: 4, lr: 1.0e-3, steps: 3, save_every: 3, eval_every: 3, max_new_tokens: 3, eval_examples: 8}
output: {dir: RUN}
"""
TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
# What a user may have configured to send runs elsewhere: unset, so every tracker stays in the run directory.
REMOTE = ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY", "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_DIR")


@pytest.fixture
def offline(monkeypatch):
    for name in REMOTE:
        monkeypatch.delenv(name, raising=False)
    for library in TRACKERS:
        pytest.importorskip("torch.utils.tensorboard" if library == "tensorboard" else library)


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

    for library in ("mlflow", "wandb", "trackio"):
        monkeypatch.setitem(sys.modules, library, None)  # as if not installed
        with pytest.raises(UsageError, match=rf"logger needs {library}: pip install 'rlvrx\[tracking\]'"):
            Tracker([library], tmp_path, project="p", run_name="r", task="t")
    assert not (tmp_path / "tracking.json").exists()


def test_summary_metrics_are_a_stage_summarys_finite_numbers():
    summary = {"median_r2": 0.8, "n_params": 10, "steps": [0, 1], "ok": True, "nan": float("nan"), "path": "x", "m": {"arithmetic": {"pass@1": 0.5}}}
    assert summary_metrics("eval", summary) == {"summary/eval/median_r2": 0.8, "summary/eval/n_params": 10.0, "summary/eval/m/arithmetic/pass@1": 0.5}
    assert len(summary_metrics("s", {f"k{i}": i for i in range(500)})) == 200


def read_tensorboard(logdir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_mlflow(run_dir):
    """(the runs in the rlvrx experiment of RUN/mlflow.db, client)"""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "rlvrx"]
    return client.search_runs([experiment.experiment_id]), client


def test_every_tracker_continues_its_run_in_a_later_process_without_duplicates(tmp_path, offline):
    """Two Tracker sessions on one run directory, as a training run and its resume are: the second
    reopens the same tracker runs and skips the steps they hold (a resume recomputes those after the last checkpoint)."""
    from rlvrx.train.tracking import Tracker

    def record(step):
        return {"stage": "grpo", "step": step, "grad_step": step, "reward_mean": 0.1 * step, "loss": 1.0 - step}

    sft = [{"stage": "sft", "step": 0, "sft_step": s, "loss": 2.0 / s} for s in (1, 2)]
    first = Tracker(["console", *TRACKERS], tmp_path, project="rlvrx", run_name="r", task="arithmetic", config={"recipe": "a: 1"})
    for r in [*sft, *map(record, range(4))]:
        first.log(r)
    first.close()
    second = Tracker(list(TRACKERS), tmp_path, project="rlvrx", run_name="r", task="arithmetic", config={"recipe": "a: 1"})
    for r in [*sft, *map(record, range(2, 6))]:  # resumed from step 1: 2 and 3 are recomputed
        second.log(r)
    second.log_summary("eval", {"base": {"arithmetic": {"pass@1": 0.25}}, "steps": [1, 2]}, step=5)
    second.close()
    state = json.loads((tmp_path / "tracking.json").read_text())["trackers"]
    assert {name: state[name]["last_step"] for name in TRACKERS} == {name: {"sft": 2, "rl": 5} for name in TRACKERS}
    steps = list(range(6))
    want = [(s, pytest.approx(0.1 * s)) for s in steps]

    scalars = read_tensorboard(tmp_path / "tensorboard")
    assert scalars["critic/score/mean"] == want and scalars["sft/loss"] == [(1, 2.0), (2, 1.0)]
    assert scalars["summary/eval/base/arithmetic/pass@1"] == [(5, 0.25)]

    [mlrun], client = read_mlflow(tmp_path)
    assert mlrun.info.run_id == state["mlflow"]["run_id"] and mlrun.info.status == "FINISHED" and mlrun.data.params == {"recipe": "a: 1"}
    assert sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "critic/score/mean")) == want
    assert [(m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "summary/eval/base/arithmetic/pass_at_1")] == [(5, 0.25)]

    ids, history, summary = wandb_run(tmp_path / "wandb", state["wandb"]["id"])
    assert ids == [state["wandb"]["id"]] * 2  # one offline-run folder per process, one run id (`wandb sync` joins them)
    rl = [row for row in history if "critic/score/mean" in row]
    assert [(row["training/global_step"], row["critic/score/mean"]) for row in rl] == want
    assert [(row["sft/step"], row["sft/loss"]) for row in history if "sft/loss" in row] == [(1, 2.0), (2, 1.0)]
    assert summary["summary/eval/base/arithmetic/pass@1"] == 0.25

    run_ids, rows = trackio_rows(tmp_path / "trackio" / "rlvrx.db", "r")
    assert len(run_ids) == 1
    assert [(step, m["critic/score/mean"]) for step, m in rows if "critic/score/mean" in m] == want
    assert [(step, m["sft/loss"]) for step, m in rows if "sft/loss" in m] == [(1, 2.0), (2, 1.0)]
    assert [(step, m) for step, m in rows if any(k.startswith("summary/") for k in m)] == [(5, {"summary/eval/base/arithmetic/pass@1": 0.25})]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One 3-step tiny run with --logger tensorboard,mlflow,wandb,trackio (the tests below only read it, or resume it at its end)."""
    for library in ("tensorboard", "mlflow", "wandb", "trackio"):
        pytest.importorskip(library)
    tmp_path = tmp_path_factory.mktemp("tracked")
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("RUN", str(run)))
    with pytest.MonkeyPatch.context() as patch:
        for name in REMOTE:
            patch.delenv(name, raising=False)
        code, out, err = run_cli("train", recipe, "--logger", "tensorboard,mlflow,wandb,trackio", "--no-progress")
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
    assert "--logger 'tensorboard,neptune': expected comma-separated names from console, tensorboard, mlflow, wandb, trackio" in out + err


@pytest.mark.slow
def test_wandb_and_trackio_hold_the_metrics_jsonl_values(tracked_run):
    run, _, records = tracked_run
    rl = [r for r in records if r.get("stage") != "sft"]
    assert [r["step"] for r in rl] == [0, 1, 2, 3]
    sft = [r for r in records if r.get("stage") == "sft"]
    evals = [(r["step"], r["test_accuracy"]) for r in records if "test_accuracy" in r]
    state = json.loads((run / "tracking.json").read_text())["trackers"]

    ids, history, _ = wandb_run(run / "wandb", state["wandb"]["id"])
    assert ids == [state["wandb"]["id"]]
    for key in ("reward_mean", "loss", "entropy", "grad_norm", "response_length", "grad_step"):
        logged = [(row["training/global_step"], row[VERL_NAMES[key]]) for row in history if VERL_NAMES[key] in row]
        assert logged == [(r["step"], pytest.approx(r[key])) for r in rl if key in r], key
    assert [(row["sft/step"], row["sft/loss"]) for row in history if "sft/loss" in row] == [(r["sft_step"], pytest.approx(r["loss"])) for r in sft]
    acc = "val-core/arithmetic/acc/mean@1"
    assert [(row["training/global_step"], row[acc]) for row in history if acc in row] == [(s, pytest.approx(a)) for s, a in evals]

    run_ids, rows = trackio_rows(run / "trackio" / "rlvrx.db", "run")
    assert len(run_ids) == 1
    for key in ("reward_mean", "loss", "entropy", "grad_norm", "response_length", "grad_step"):
        assert [(step, m[VERL_NAMES[key]]) for step, m in rows if VERL_NAMES[key] in m] == [(r["step"], pytest.approx(r[key])) for r in rl if key in r], key
    assert [(step, m["sft/loss"]) for step, m in rows if "sft/loss" in m] == [(r["sft_step"], pytest.approx(r["loss"])) for r in sft]
    assert [(step, m[acc]) for step, m in rows if acc in m] == [(s, pytest.approx(a)) for s, a in evals]


@pytest.mark.slow
def test_an_interrupted_run_resumed_longer_is_one_tracker_run_with_each_step_once(tmp_path, offline):
    """3 steps (checkpoints 0, 2, 3), killed as if between logging step 3 and saving its checkpoint, then resumed
    to 6 steps: every tracker holds one run with steps 0..6 once, equal to metrics.jsonl."""
    from rlvrx.trajectory import Trajectory

    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("RUN", str(run)).replace("save_every: 3, eval_every: 3", "save_every: 2, eval_every: 2"))
    loggers = ",".join(TRACKERS)
    code, out, err = run_cli("train", recipe, "--logger", loggers, "--no-progress")
    assert code == 0, out + err
    shutil.rmtree(run / "checkpoints" / "step_000003")
    traj = Trajectory.load(run)
    traj.entries = [e for e in traj.entries if e.step <= 2]
    traj.save()
    code, out, err = run_cli("train", recipe, "grpo.steps=6", "--force", "--logger", loggers, "--no-progress")
    assert code == 0, out + err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    want = [(r["step"], pytest.approx(r["reward_mean"])) for r in steps]
    want_loss = [(r["step"], pytest.approx(r["loss"])) for r in steps]
    state = json.loads((run / "tracking.json").read_text())["trackers"]

    assert read_tensorboard(run / "tensorboard")["critic/score/mean"] == want
    [mlrun], client = read_mlflow(run)
    assert mlrun.info.run_id == state["mlflow"]["run_id"]
    assert sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "actor/pg_loss")) == want_loss
    ids, history, _ = wandb_run(run / "wandb", state["wandb"]["id"])
    assert ids == [state["wandb"]["id"]] * 2
    assert [(row["training/global_step"], row["critic/score/mean"]) for row in history if "critic/score/mean" in row] == want
    run_ids, rows = trackio_rows(run / "trackio" / "rlvrx.db", "run")
    assert len(run_ids) == 1
    assert [(step, m["actor/pg_loss"]) for step, m in rows if "actor/pg_loss" in m] == want_loss


PIPELINE = """stages:
  - kind: train
  - kind: linearity-weights
  - kind: eval
    options: {task: arithmetic, samples: 2, limit: 8}
"""


@pytest.mark.slow
def test_rlvrx_run_adds_each_stages_summary_to_the_same_tracker_run(tmp_path, offline):
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("RUN", str(run)).replace("save_every: 3", "save_every: 1") + PIPELINE)
    code, out, err = run_cli("run", recipe, "--logger", ",".join(TRACKERS))
    assert code == 0, out + err
    stages = {name: json.loads((run / "stages" / f"{name}.json").read_text()) for name in ("train", "linearity-weights", "eval")}
    [model] = stages["eval"]  # the eval stage's one model, RUN:last
    r2 = ("summary/linearity-weights/n_filtered", stages["linearity-weights"]["n_filtered"])  # 3 tiny steps: R² itself is null
    pass1 = (f"summary/eval/{model}/arithmetic/pass@1", stages["eval"][model]["arithmetic"]["pass@1"])
    end = ("summary/train/test_accuracy_end", stages["train"]["test_accuracy_end"])
    state = json.loads((run / "tracking.json").read_text())["trackers"]

    scalars = read_tensorboard(run / "tensorboard")
    for key, value in (r2, pass1, end):
        assert scalars[key] == [(3, pytest.approx(value))], key  # at the run's last training step
    assert [s for s, _ in scalars["critic/score/mean"]] == [1, 2, 3]
    [mlrun], client = read_mlflow(run)
    for key, value in (r2, pass1, end):
        assert mlrun.data.metrics[key.replace("@", "_at_").replace(":", "_")] == pytest.approx(value), key  # the model is named run:3
    ids, history, summary = wandb_run(run / "wandb", state["wandb"]["id"])
    assert set(ids) == {state["wandb"]["id"]}
    for key, value in (r2, pass1, end):
        assert summary[key] == pytest.approx(value), key
    run_ids, rows = trackio_rows(run / "trackio" / "rlvrx.db", "run")
    assert len(run_ids) == 1
    logged = {k: (step, v) for step, m in rows for k, v in m.items()}
    for key, value in (r2, pass1, end):
        assert logged[key] == (3, pytest.approx(value)), key


@pytest.mark.slow
def test_rl_extra_logs_the_gradient_step_and_the_effective_step(tmp_path, offline):
    run = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.replace("RUN", str(run)).replace("steps: 3,", "steps: 4,") + "rl_extra: {m: 2, n: 3, iterations: 2}\n")
    code, out, err = run_cli("rl-extra", recipe, "--logger", "tensorboard,mlflow", "--no-progress")
    assert code == 0, out + err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    counters = [(r["step"], float(r["grad_step"])) for r in records if r.get("stage") in ("grpo", "jump")]
    assert counters == [(0, 0), (1, 1), (2, 2), (5, 2), (6, 3), (7, 4), (10, 4)]  # m = 2 steps, then a jump of n = 3
    assert read_tensorboard(run / "tensorboard")["training/grad_step"] == counters
    [mlrun], client = read_mlflow(run)
    assert sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "training/grad_step")) == counters
    assert sorted((m.step, m.value) for m in client.get_metric_history(mlrun.info.run_id, "training/global_step")) == [(s, float(s)) for s, _ in counters]
