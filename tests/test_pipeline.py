"""`rlvrx run` end to end on the quickstart recipe (smaller settings), then `rlvrx report`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlvrx.config import load_recipe
from rlvrx.errors import UsageError
from rlvrx.cli.pipeline import check_stages, run_pipeline, stage_argv

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes/quickstart.yaml"


def stage_index(name: str) -> int:
    """The position of the quickstart stage called `name` (its name, default its kind)."""
    names = [s.name or s.kind for s in load_recipe(QUICKSTART).stages]
    assert name in names, f"quickstart.yaml has no stage {name!r}: {names}"
    return names.index(name)


def stage(name: str) -> str:
    """The override prefix of that stage: overrides address list items by index."""
    return f"stages.{stage_index(name)}"


SMALL = [
    "sft.steps=150",
    "grpo.steps=12",
    "grpo.lr=5e-5",  # 12 steps at the quickstart's 1e-5 move many weights less than linearity's 1e-4 filter
    "grpo.batch_size=16",
    "grpo.save_every=2",
    "grpo.eval_every=6",
    "task.n_test=40",
    f"{stage('linearity-logprobs')}.options.generate=8",
    f"{stage('extrapolate-weights')}.options={{base: 6, second: 10, target: 12}}",
    f"{stage('extrapolate-logits')}.options={{base: 6, second: 10, target: 12, task: arithmetic, samples: 2, limit: 20}}",
    f'{stage("eval")}.args=["{{run}}:6", "{{run}}:10", "{{run}}:12", "{{run}}/extrapolated/step_000012"]',
    f"{stage('eval')}.options.generations={{run}}/extrapolated/logits-s6-s10-t12/arithmetic.jsonl",
    f"{stage('eval')}.options.limit=20",
    f"{stage('eval')}.options.samples=2",
    f"{stage('eval')}.options.name=[base, second, real, weights, logits]",
    f"{stage('linearity-rank')}.options.window=0:12",
    f"{stage('extrapolate-compare')}.options={{target: 12, window: '6:10', task: arithmetic, samples: 2, limit: 10}}",
]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pipe") / "quick"
    overrides = [f"output.dir={run}"] + SMALL
    results = run_pipeline(QUICKSTART, overrides, echo=lambda line: None)
    return run, overrides, results


@pytest.mark.slow
def test_every_stage_ran_and_left_sane_outputs(quickstart_run):
    run, _, results = quickstart_run
    assert [r["status"] for r in results] == ["done"] * 8
    stages = {p.stem: json.loads(p.read_text()) for p in (run / "stages").glob("*.json")}
    assert set(stages) == {
        "train",
        "linearity-weights",
        "linearity-logprobs",
        "extrapolate-weights",
        "extrapolate-logits",
        "eval",
        "linearity-rank",
        "extrapolate-compare",
    }
    assert 0 < stages["linearity-rank"]["median_rank1_energy"] <= 1
    shootout = stages["extrapolate-compare"]
    assert shootout["window_steps"] == [6, 8, 10] and set(shootout["accuracy"]) == {"real", "window-end", "two-point", "lstsq", "rank1", "alpharl"}
    assert all(row["relative"] > 0 for row in shootout["predictors"].values())
    train = stages["train"]
    assert train["steps"] == 12 and train["checkpoints"] == 7
    assert 0 <= train["test_accuracy_end"] <= 1
    lin = stages["linearity-weights"]
    assert lin["steps"] == [0, 2, 4, 6, 8, 10, 12]
    assert 0 <= lin["median_r2"] <= 1 and 0 <= lin["frac_r2_gt_0_9"] <= lin["frac_r2_gt_0_7"] <= 1
    assert lin["n_params"] > 0
    assert (run / "linearity/weights/r2_hist.png").is_file() and (run / "linearity/weights/r2_heatmap.png").is_file()
    assert stages["linearity-logprobs"]["steps"] == lin["steps"]
    assert stages["extrapolate-weights"]["alpha"] == pytest.approx((12 - 6) / (10 - 6))
    assert (run / "extrapolated/step_000012/model.safetensors").is_file()
    assert (run / "extrapolated/logits-s6-s10-t12/arithmetic.jsonl").is_file()
    ev = stages["eval"]
    assert list(ev) == ["base", "second", "real", "weights", "logits"]
    for model in ev.values():
        metrics = model["arithmetic"]
        assert metrics["problems"] == 20 and metrics["n"] == 2
        assert 0 <= metrics["pass@1"] <= metrics["pass@2"] <= 1
        assert set(metrics["stderr"]) == {"avg", "pass@1", "pass@2", "maj@1", "maj@2"}


@pytest.mark.slow
def test_rerun_does_no_work(quickstart_run):
    run, overrides, _ = quickstart_run
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    results = run_pipeline(QUICKSTART, overrides, echo=lambda line: None)
    assert [r["status"] for r in results] == ["skipped"] * 8
    after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.slow
def test_report_html_and_pngs(quickstart_run):
    run, _, _ = quickstart_run
    out = subprocess.run([sys.executable, "-m", "rlvrx", "report", str(run)], capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0, out.stderr
    assert "median R²" in out.stdout and "eval: arithmetic" in out.stdout
    page = (run / "report/index.html").read_text()
    assert page.count("data:image/png;base64,") >= 4
    assert "Resolved recipe" in page and "grpo:" in page
    assert "pass@2 ± stderr" in page and "± one standard error over problems" in page
    assert "Rank-1 structure and predictors" in page and "predictor shoot-out: step 12 from 6..10" in page
    assert (run / "report/training.png").is_file() and (run / "report/trajectories.png").is_file()


def test_stage_options_are_checked_before_any_work(tmp_path):
    recipe = load_recipe(QUICKSTART, [f"{stage('linearity-weights')}.options={{sampel: 0.001}}", f"output.dir={tmp_path / 'x'}"])
    problems = check_stages(recipe)
    assert problems == [f"stages[{stage_index('linearity-weights')}] (linearity-weights).options.sampel: unknown option; did you mean sample?"]
    with pytest.raises(UsageError, match="sampel"):
        run_pipeline(QUICKSTART, [f"{stage('linearity-weights')}.options={{sampel: 0.001}}", f"output.dir={tmp_path / 'x'}"], echo=lambda l: None)
    assert not (tmp_path / "x").exists()
    with pytest.raises(UsageError, match="no such stage"):
        run_pipeline(QUICKSTART, [f"output.dir={tmp_path / 'x'}"], only="evl", echo=lambda l: None)


def test_stage_command_line(tmp_path):
    recipe = load_recipe(QUICKSTART, [f"output.dir={tmp_path}"])
    argv = stage_argv(recipe.stages[stage_index("eval")], tmp_path, Path("r.yaml"), [], tmp_path / "stages/eval.json")
    assert argv[:5] == ["eval", f"{tmp_path}:100", f"{tmp_path}:150", f"{tmp_path}:200", f"{tmp_path}/extrapolated/step_000200"]
    assert argv[argv.index("--generations") + 1] == f"{tmp_path}/extrapolated/logits-s100-s150-t200/arithmetic.jsonl"
    assert argv.count("--name") == 5
    assert argv[argv.index("--json") + 1] == str(tmp_path / "stages/eval.json")


def test_stages_on_the_recipes_task_get_its_settings_unless_they_set_their_own(tmp_path):
    # only what differs from arithmetic's defaults: the quickstart's n_train; no option on stages without a task
    quickstart = load_recipe(QUICKSTART, [f"output.dir={tmp_path}"])
    for st in quickstart.stages:
        argv = stage_argv(st, tmp_path, Path("r.yaml"), [], tmp_path / "s.json", quickstart.task)
        pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "--task-option"]
        assert pairs == (["n_train=4000"] if "task" in st.options else [])
    harder = load_recipe(QUICKSTART, [f"output.dir={tmp_path}", "task.digits=1", "task.operators=['*']", "task.seed=7", "task.n_train=80", "task.n_test=20"])
    argv = stage_argv(harder.stages[stage_index("eval")], tmp_path, Path("r.yaml"), [], tmp_path / "s.json", harder.task)
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "--task-option"]
    assert pairs == ["digits=1", 'operators=["*"]', "n_train=80", "n_test=20", "seed=7"]
    from rlvrx.cli.common import task_options
    from rlvrx.tasks.registry import get_task

    task = get_task("arithmetic", **task_options(pairs))  # the stage's command builds the recipe's test set (100 problems in all)
    assert (task.digits, task.operators, task.seed, len(list(task.test_examples()))) == (1, ("*",), 7, 20)
    for kind in ("extrapolate-logits", "linearity-logprobs"):
        assert "--task-option" in stage_argv(harder.stages[stage_index(kind)], tmp_path, Path("r.yaml"), [], tmp_path / "s.json", harder.task)
    own = harder.stages[stage_index("eval")].model_copy(update={"options": {**harder.stages[stage_index("eval")].options, "task_option": ["digits=2"]}})
    argv = stage_argv(own, tmp_path, Path("r.yaml"), [], tmp_path / "s.json", harder.task)
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--task-option"] == ["digits=2"]  # the stage's own choice wins


def test_every_stage_kind_has_a_command_and_default_arguments():
    from rlvrx.cli.pipeline import COMMANDS, DEFAULT_ARGS
    from rlvrx.config import STAGE_KINDS

    assert tuple(COMMANDS) == STAGE_KINDS and tuple(DEFAULT_ARGS) == STAGE_KINDS


@pytest.mark.slow
def test_a_stage_whose_command_changed_reruns_and_replaces_its_outputs(quickstart_run):
    run, overrides, _ = quickstart_run
    generations = run / "extrapolated/logits-s6-s10-t12/arithmetic.jsonl"
    assert {len(json.loads(line)["completions"]) for line in generations.read_text().splitlines()} == {2}
    changed = overrides + [f"{stage('extrapolate-logits')}.options.samples=3"]
    trained = (run / "metrics.jsonl").read_text()
    results = {r["name"]: r["status"] for r in run_pipeline(QUICKSTART, changed, echo=lambda line: None)}
    assert results["extrapolate-logits"] == "done" and results["linearity-weights"] == "skipped"
    assert (run / "metrics.jsonl").read_text() == trained  # train's command took the new override: it resumed a finished run
    assert {len(json.loads(line)["completions"]) for line in generations.read_text().splitlines()} == {3}
    again = run_pipeline(QUICKSTART, changed, echo=lambda line: None)
    assert {r["name"]: r["status"] for r in again}["extrapolate-logits"] == "skipped"
