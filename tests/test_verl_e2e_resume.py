"""Where a rerun of a verl job resumes (rlvrx.backends.verl.launch.resume_point), on hand-made
checkpoint dirs laid out like verl's: no verl needed. The real jobs are in tests/test_verl_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlvrx.backends.verl.launch import latest_saved_step, resume_point
from rlvrx.config import load_recipe
from rlvrx.errors import RlvrxError

QUICKSTART = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml"


def recipe(run: Path, *overrides: str):
    return load_recipe(QUICKSTART, ["backend=verl", "sft.enabled=false", "grpo.steps=4", f"output.dir={run}", *overrides])


def saved(run: Path, *steps: int, tracker: str | None = None) -> Path:
    ckpt = run / "verl_checkpoints"
    for step in steps:
        (ckpt / f"global_step_{step}").mkdir(parents=True)
    ckpt.mkdir(parents=True, exist_ok=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text(tracker if tracker is not None else str(max(steps)))
    return ckpt


def test_fresh_run_midway_and_finished(tmp_path):
    run = tmp_path / "global_step_7" / "run"  # a step number in the path is not the step
    assert resume_point(recipe(run), run) == (None, 4, True)
    saved(run, 2)
    assert resume_point(recipe(run), run) == (2, 4, True)
    (run / "verl_checkpoints" / "global_step_4").mkdir()
    (run / "verl_checkpoints" / "latest_checkpointed_iteration.txt").write_text("4\n")
    assert resume_point(recipe(run), run) == (4, 4, False)
    assert resume_point(recipe(run, "grpo.steps=6"), run) == (4, 6, True)
    # The user's own overrides decide what verl does.
    assert resume_point(recipe(run, "verl.overrides=[trainer.total_training_steps=8]"), run) == (4, 8, True)
    assert resume_point(recipe(run, "verl.overrides=[trainer.resume_mode=disable]"), run) == (None, 4, True)


def test_in_job_rl_extra_is_done_only_once_the_last_jump_is_saved(tmp_path):
    run = tmp_path / "run"
    rx = ("rl_extra.m=2", "rl_extra.n=2", "rl_extra.iterations=2")
    ckpt = saved(run, 2, 4)
    assert resume_point(recipe(run, *rx), run) == (4, 4, True)  # stopped between the last save and its jump
    jump = ckpt / "rl_extra" / "jump_0002"
    jump.mkdir(parents=True)
    (jump / "rlvrx_jump.json").write_text("{}")
    assert resume_point(recipe(run, *rx), run) == (4, 4, False)


@pytest.mark.parametrize("tracker, message", [("3", "names step 3"), ("two", "not a step number")])
def test_a_tracker_verl_would_misread_is_an_error(tmp_path, tracker, message):
    ckpt = saved(tmp_path / "run", 2, tracker=tracker)
    with pytest.raises(RlvrxError, match=message):
        latest_saved_step(ckpt)
