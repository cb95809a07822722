"""Native GRPO trainer and RL-Extra on a tiny model: bookkeeping, resume bit-identity, jump formula."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlvrx.config import validate_recipe
from rlvrx.errors import RlvrxError, UsageError
from rlvrx.formulas import jump
from rlvrx.train.rl_extra import RLExtraTrainer, lstsq_predict
from rlvrx.train.trainer import Trainer
from rlvrx.trajectory import Trajectory

TINY = {
    "task": {"name": "arithmetic", "digits": 1, "n_train": 60, "n_test": 12},
    "sft": {"enabled": False},
    "grpo": {"num_generations": 4, "batch_size": 4, "lr": 1e-3, "steps": 6, "save_every": 2, "max_new_tokens": 3, "eval_examples": 12},
}


@pytest.fixture(autouse=True)
def _use_sft_model(sft_model, monkeypatch):
    monkeypatch.setitem(TINY, "model", {"path": str(sft_model)})


def recipe(tmp_path, name="run", **sections):
    raw = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        raw.setdefault(key, {})
        if isinstance(value, dict):
            raw[key].update(value)
        else:
            raw[key] = value
    raw["output"] = {"dir": str(tmp_path / name)}
    return validate_recipe(raw)


def weights(run_dir: Path, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_trajectory_metrics_and_checkpoints(tmp_path):
    r = recipe(tmp_path)
    summary = Trainer(r).fit(show_progress=False)
    run = tmp_path / "run"
    traj = Trajectory.load(run)
    assert traj.steps == [0, 2, 4, 6]
    assert all(e.kind == "rl" for e in traj)
    assert summary["steps"] == 6 and summary["grad_steps"] == 6
    records = [m for m in metrics(run) if m["stage"] == "grpo" and m["step"] > 0]
    assert [m["step"] for m in records] == [1, 2, 3, 4, 5, 6]
    for key in ("reward_mean", "accuracy", "advantage_std", "frac_zero_std", "loss", "kl", "entropy", "response_length", "grad_norm", "step_time"):
        assert all(key in m for m in records), key
    assert 0.0 <= summary["test_accuracy_end"] <= 1.0
    assert (run / "recipe.yaml").is_file()
    # the step-0 checkpoint is loadable by transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(run / "checkpoints/step_000000")
    AutoTokenizer.from_pretrained(run / "checkpoints/step_000000")


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    full = recipe(tmp_path, "full")
    Trainer(full).fit(show_progress=False)
    # Same recipe, interrupted after the step-2 checkpoint: later checkpoints never written.
    part = recipe(tmp_path, "part")
    Trainer(part).fit(show_progress=False)
    run = tmp_path / "part"
    for step in (4, 6):
        shutil.rmtree(run / "checkpoints" / f"step_{step:06d}")
    traj = Trajectory.load(run)
    traj.entries = [e for e in traj.entries if e.step <= 2]
    traj.save()
    summary = Trainer(part).fit(show_progress=False)
    assert summary["resumed_from"] == 2
    assert_same_weights(weights(tmp_path / "full", 6), weights(run, 6))
    start, end = weights(run, 0), weights(run, 6)
    assert any(not torch.equal(start[k], end[k]) for k in start)  # training moved the weights
    steps = [m["step"] for m in metrics(run) if m["stage"] == "grpo"]
    assert steps == [0, 1, 2, 3, 4, 5, 6]  # no duplicated or lost lines


def test_rerun_of_finished_run_does_nothing_and_other_recipe_is_refused(tmp_path):
    r = recipe(tmp_path)
    Trainer(r).fit(show_progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    Trainer(r).fit(show_progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    other = recipe(tmp_path, grpo={"lr": 2e-3})
    with pytest.raises(UsageError, match="different recipe"):
        Trainer(other).fit(show_progress=False)
    # what does not change training (the `rlvrx run` stages, the description) is not a different recipe
    staged = recipe(tmp_path, description="with stages", stages=[{"kind": "linearity-weights"}])
    Trainer(staged).fit(show_progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_bad_batch_shapes_and_empty_task(tmp_path):
    with pytest.raises(UsageError, match="not divisible"):
        Trainer(recipe(tmp_path, grpo={"mini_batch_size": 3}))
    with pytest.raises(UsageError, match="no training prompts"):
        Trainer(recipe(tmp_path, task={"n_train": 0})).fit(show_progress=False)


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    # An absurd learning rate blows the weights up after the first update with a learning signal.
    r = recipe(tmp_path, grpo={"lr": 1e30, "steps": 6, "save_every": 1, "max_grad_norm": 1e30})
    with pytest.raises(RlvrxError, match="non-finite.*last good checkpoint .*step_0000"):
        Trainer(r).fit(show_progress=False)
    traj = Trajectory.load(tmp_path / "run")
    assert traj.verify() == []
    for entry in traj:  # every registered checkpoint holds finite weights
        for tensor in load_file(str(traj.resolve(entry) / "model.safetensors")).values():
            assert torch.isfinite(tensor).all()


def test_lstsq_predict_recovers_exact_line():
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    m = 5
    points = [a + b * t for t in range(m + 1)]
    s_y = sum(points)
    s_ty = sum(t * p for t, p in enumerate(points))
    assert torch.allclose(lstsq_predict(s_y, s_ty, m, 9.0), a + 9 * b, atol=1e-12)


def _rl_extra(tmp_path, name="rx", **x):
    settings = {"m": 2, "n": 3, "iterations": 2}
    settings.update(x)
    return recipe(tmp_path, name, rl_extra=settings, grpo={"save_every": 1})


def test_rl_extra_bookkeeping_and_jump_in_place(tmp_path):
    r = _rl_extra(tmp_path)
    summary = RLExtraTrainer(r).fit(show_progress=False)
    run = tmp_path / "rx"
    traj = Trajectory.load(run)
    # cycle 1: steps 0,1,2 (grad 0..2), jump -> 5 (grad 2); cycle 2: 6,7 (grad 3,4), jump -> 10 (grad 4)
    assert [(e.step, e.kind, e.grad_step) for e in traj] == [
        (0, "rl", 0),
        (1, "rl", 1),
        (2, "rl", 2),
        (5, "extrapolated", 2),
        (6, "rl", 3),
        (7, "rl", 4),
        (10, "extrapolated", 4),
    ]
    assert summary["grad_steps"] == 4 and summary["steps"] == 10
    assert any(m.get("frac_zero_std", 1.0) < 1.0 for m in metrics(run))  # GRPO had a learning signal
    # the jumped state equals W_a + ((m + n) / m) (W_b - W_a) exactly, norms copied from W_b
    for anchor, before, after in ((0, 2, 5), (5, 7, 10)):
        wa, wb, wj = weights(run, anchor), weights(run, before), weights(run, after)
        for name in wa:
            if "norm" in name:
                assert torch.equal(wj[name], wb[name]), name
            else:
                assert torch.equal(wj[name], jump(wa[name], wb[name], 5 / 2)), name
    jumps = [m for m in metrics(run) if m["stage"] == "jump"]
    assert [(m["step"], m["grad_step"]) for m in jumps] == [(5, 2), (10, 4)]


@pytest.mark.parametrize("policy", ["keep", "reset", "rescale"])
def test_optimizer_state_policies(tmp_path, policy):
    r = _rl_extra(tmp_path, f"opt-{policy}", optimizer_state=policy, iterations=1)
    trainer = RLExtraTrainer(r)
    trainer.fit(show_progress=False)
    state = torch.load(tmp_path / f"opt-{policy}" / "checkpoints/step_000005/trainer_state.pt", weights_only=False)["optimizer"]["state"]
    before = torch.load(tmp_path / f"opt-{policy}" / "checkpoints/step_000002/trainer_state.pt", weights_only=False)["optimizer"]["state"]
    if policy == "reset":
        assert state == {}
    else:
        assert state.keys() == before.keys()
        for k in state:
            assert torch.equal(state[k]["exp_avg_sq"], before[k]["exp_avg_sq"])
            if policy == "keep":
                assert torch.equal(state[k]["exp_avg"], before[k]["exp_avg"])
            else:
                assert not state[k]["exp_avg"].any()


@pytest.mark.slow
@pytest.mark.parametrize("fit", ["two_point", "lstsq"])
def test_rl_extra_resume_across_a_jump_is_bit_identical(tmp_path, fit):
    full = _rl_extra(tmp_path, f"full-{fit}", fit=fit)
    RLExtraTrainer(full).fit(show_progress=False)
    part = _rl_extra(tmp_path, f"part-{fit}", fit=fit)
    RLExtraTrainer(part).fit(show_progress=False)
    run = tmp_path / f"part-{fit}"
    # interrupted right after the pre-jump save of cycle 2's first step... keep steps <= 6
    traj = Trajectory.load(run)
    for e in traj.entries:
        if e.step > 6:
            shutil.rmtree(traj.resolve(e))
    traj.entries = [e for e in traj.entries if e.step <= 6]
    traj.save()
    RLExtraTrainer(part).fit(show_progress=False)
    assert_same_weights(weights(tmp_path / f"full-{fit}", 10), weights(run, 10))
    # and interrupted between the pre-jump save and the jump itself
    traj = Trajectory.load(run)
    shutil.rmtree(traj.path_of(10))
    traj.entries = [e for e in traj.entries if e.step != 10]
    traj.save()
    RLExtraTrainer(part).fit(show_progress=False)
    assert_same_weights(weights(tmp_path / f"full-{fit}", 10), weights(run, 10))


def test_model_dir_without_tokenizer_is_refused(tmp_path, sft_model):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(sft_model / name, bare / name)
    r = recipe(tmp_path)
    r.model.path = str(bare)
    with pytest.raises(UsageError, match="no tokenizer"):
        Trainer(r).fit(show_progress=False)


def test_shared_prompt_logprobs_equal_the_packed_forward():
    """The trainer runs each prompt once per group; log-probs and gradients match the packed forward."""
    from rlvrx.generation import batch_token_logprobs, left_pad, pack_prompt_response
    from rlvrx.generation.scoring import shared_prompt_token_logprobs
    from rlvrx.tiny import build_tiny_model

    model, _ = build_tiny_model(layers=2, hidden=32, heads=2, kv_heads=1, intermediate=64, max_position=32, seed=3)
    model.train()
    prompts = [[1, 5, 6, 7], [1, 8], [1, 9, 9, 4, 2, 3]]
    index = [0, 0, 1, 1, 2, 2]
    responses = [[10, 11, 2], [12], [13, 14, 15, 16], [], [17, 18], [19]]
    packed = pack_prompt_response([prompts[i] for i in index], responses)
    width = packed.response_width
    mask = packed.response_mask.float()

    def run(fn):
        model.zero_grad()
        lp, ent = fn()
        (lp * mask).sum().backward()
        return lp.detach(), ent, [p.grad.clone() for p in model.parameters()]

    ref = run(lambda: batch_token_logprobs(model, packed.input_ids, packed.attention_mask, logits_to_keep=width, temperature=0.7))
    ids, pmask = left_pad(prompts)
    got = run(lambda: shared_prompt_token_logprobs(model, ids, pmask, torch.tensor(index), packed.input_ids[:, -width:], packed.response_mask, temperature=0.7))
    keep = packed.response_mask.bool()
    torch.testing.assert_close(got[0][keep], ref[0][keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1][keep], ref[1][keep], atol=1e-5, rtol=0)
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


class _WritesMarker:
    """Unpickling this calls pathlib.Path.touch: a crafted trainer_state.pt that would run code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("damage", ["code", "garbage", "empty"])
def test_resume_never_runs_code_from_trainer_state_and_names_the_file(tmp_path, damage):
    r = recipe(tmp_path)
    Trainer(r).fit(show_progress=False)
    state = tmp_path / "run" / "checkpoints" / "step_000006" / "trainer_state.pt"
    marker = tmp_path / "PWNED"
    if damage == "code":
        torch.save({"step": 6, "optimizer": _WritesMarker(marker)}, state)
    else:
        state.write_bytes(b"" if damage == "empty" else b"\x80\x04garbage" * 10)
    with pytest.raises(RlvrxError, match=r"trainer_state\.pt: (refused to unpickle|not a readable torch file)") as info:
        Trainer(r).fit(show_progress=False)
    assert "\n" not in str(info.value)
    assert not marker.exists()
