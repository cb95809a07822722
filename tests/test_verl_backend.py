"""backend: verl pieces that need no verl: recipe -> overrides, Hydra quoting, refusals, the RL-Extra
restart-loop jump on HF checkpoints, and checkpoint registration from a verl-shaped run dir."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlvrx.backends.verl.jump import extrapolate_checkpoint, jump_factor, kept
from rlvrx.backends.verl.launch import hf_weights_dir, register_step
from rlvrx.backends.verl.overrides import (
    DataFiles,
    build_overrides,
    check_recipe,
    check_user_overrides,
    entry_module,
    hydra_value,
)
from rlvrx.io.reader import Checkpoint
from rlvrx.io.writer import save_state_dict
from rlvrx.config import load_recipe
from rlvrx.formulas import jump
from rlvrx.errors import UsageError
from rlvrx.tiny import build_tiny_model, save_tiny_model
from rlvrx.trajectory import Trajectory

REPO = Path(__file__).resolve().parents[1]
DATA = DataFiles(train=Path("/d/train.parquet"), val=Path("/d/val.parquet"), n_train=10, n_val=5)


def _overrides(recipe, **kw) -> dict[str, str]:
    items = build_overrides(recipe, Path("/runs/x"), DATA, "/models/base", **kw)
    return dict(item.split("=", 1) for item in items)


def test_grpo_recipe_maps_to_verl_names():
    recipe = load_recipe(REPO / "recipes" / "deepscaler-1.5b-grpo.yaml")
    o = _overrides(recipe)
    a = "actor_rollout_ref."
    expected = {
        "algorithm.adv_estimator": "grpo",
        "algorithm.norm_adv_by_std_in_grpo": "true",
        "data.train_batch_size": "128",
        "data.max_response_length": "16384",
        a + "rollout.n": "16",
        a + "actor.strategy": "fsdp2",
        a + "actor.optim.lr": "1e-06",
        a + "actor.clip_ratio_low": "0.2",
        a + "actor.clip_ratio_high": "0.28",
        a + "actor.use_kl_loss": "false",
        a + "actor.ppo_mini_batch_size": "64",
        a + "actor.checkpoint.save_contents": "[model,optimizer,extra,hf_model]",
        a + "actor.checkpoint.load_contents": "[model,optimizer,extra]",
        a + "rollout.name": "vllm",
        a + "rollout.top_k": "-1",
        a + "model.path": "/models/base",
        "reward.custom_reward_function.path": '"pkg://rlvrx.backends.verl.reward"',
        "reward.custom_reward_function.name": "compute_score",
        "trainer.save_freq": "100",
        "trainer.test_freq": "100",
        "trainer.total_training_steps": "1300",
        "trainer.nnodes": "1",
        "trainer.n_gpus_per_node": "8",
        "trainer.default_local_dir": "/runs/x/verl_checkpoints",
        "trainer.checkpoint_callback_class": "rlvrx.backends.verl.callback.TrajectoryCallback",
        "+rlvrx.run_dir": "/runs/x",
    }
    for key, value in expected.items():
        assert o[key] == value, key
    assert not any(k.startswith("custom_reward_function") for k in o)  # never the pre-0.9 key
    assert "+rlvrx.rl_extra" not in o and entry_module(recipe) == "verl.trainer.main_ppo"


def test_kl_fixed_micro_batches_and_user_overrides_come_last():
    recipe = load_recipe(
        REPO / "recipes" / "deepscaler-1.5b-grpo.yaml",
        [
            "grpo.beta=0.01",
            "grpo.epsilon_high=null",
            "verl.micro_batch_size_per_gpu=2",
            "verl.overrides=[trainer.val_before_train=false, actor_rollout_ref.rollout.n=4]",
        ],
    )
    items = build_overrides(recipe, Path("/runs/x"), DATA, "/m")
    o = dict(item.split("=", 1) for item in items)
    a = "actor_rollout_ref."
    assert (o[a + "actor.use_kl_loss"], o[a + "actor.kl_loss_coef"], o[a + "actor.kl_loss_type"]) == ("true", "0.01", "low_var_kl")
    assert o[a + "actor.clip_ratio_high"] == o[a + "actor.clip_ratio_low"] == "0.2"  # epsilon_high defaults to epsilon
    assert o[a + "actor.use_dynamic_bsz"] == "false"
    assert o[a + "actor.ppo_micro_batch_size_per_gpu"] == o[a + "rollout.log_prob_micro_batch_size_per_gpu"] == "2"
    assert items[-2:] == ["trainer.val_before_train=false", a + "rollout.n=4"]  # Hydra: the last one wins


def test_rl_extra_recipe_adds_the_schedule_and_its_entry_point():
    recipe = load_recipe(REPO / "recipes" / "deepscaler-1.5b-rl-extra.yaml")
    o = _overrides(recipe)
    assert o["+rlvrx.rl_extra"] == "{m:100,n:100,iterations:12,optimizer_state:keep,norms:copy,anchor:cycle_start}"
    assert o["trainer.total_training_steps"] == "1200"
    assert entry_module(recipe) == "rlvrx.backends.verl.rl_extra"
    restart = load_recipe(REPO / "recipes" / "deepscaler-1.5b-rl-extra.yaml", ["verl.rl_extra_mode=restart", "rl_extra.optimizer_state=reset"])
    cycle = _overrides(
        restart, total_steps=100, checkpoint_dir=Path("/runs/x/verl_checkpoints/cycle_0003"), step_offset=200, effective_offset=400, rl_extra=False, data_seed=2
    )
    assert "+rlvrx.rl_extra" not in cycle and entry_module(restart) == "verl.trainer.main_ppo"
    assert (cycle["trainer.total_training_steps"], cycle["+rlvrx.step_offset"], cycle["+rlvrx.effective_offset"]) == ("100", "200", "400")
    assert cycle["trainer.default_local_dir"] == "/runs/x/verl_checkpoints/cycle_0003" and cycle["data.seed"] == "2"


@pytest.mark.parametrize(
    "value, text",
    [
        (True, "true"),
        (None, "null"),
        (3, "3"),
        (1e-6, "1e-06"),
        ("fsdp2", "fsdp2"),
        ("/a/b-c.parquet", "/a/b-c.parquet"),
        ("it's", '"it\'s"'),
        ("a b", '"a b"'),
        ("1e-3", '"1e-3"'),
        ("true", '"true"'),
        ("x:y", '"x:y"'),
        ('say "hi"', "'say \"hi\"'"),
        (["console", "wandb"], "[console,wandb]"),
        ({"m": 2, "norms": "copy"}, "{m:2,norms:copy}"),
    ],
)
def test_hydra_values(value, text):
    assert hydra_value(value) == text


def test_values_hydra_cannot_carry_are_refused():
    with pytest.raises(UsageError, match="Hydra override"):
        hydra_value('it\'s "both"')


def test_refusals_name_the_key_and_the_fix():
    with pytest.raises(UsageError, match=r"'reward\.custom_reward_function\.path'"):
        check_user_overrides(["custom_reward_function.path=/x.py"])
    with pytest.raises(UsageError, match=r"reward\.reward_model\.enable"):
        check_user_overrides(["+reward_model.enable=true"])
    with pytest.raises(UsageError, match="KEY=VALUE"):
        check_user_overrides(["trainer.logger"])
    check_user_overrides(["reward.custom_reward_function.name=other", "~trainer.logger"])
    problems = load_recipe(REPO / "recipes" / "quickstart.yaml", ["backend=verl", "grpo.scale_rewards=batch"])
    with pytest.raises(UsageError) as info:
        check_recipe(problems)
    assert "sft.enabled" in str(info.value) and "scale_rewards=batch" in str(info.value)  # all at once
    lstsq = load_recipe(REPO / "recipes" / "deepscaler-1.5b-rl-extra.yaml", ["rl_extra.fit=lstsq"])
    with pytest.raises(UsageError, match="fit=lstsq"):
        check_recipe(lstsq)
    keep = load_recipe(REPO / "recipes" / "deepscaler-1.5b-rl-extra.yaml", ["verl.rl_extra_mode=restart"])
    with pytest.raises(UsageError, match="optimizer_state=reset"):
        check_recipe(keep)


def test_jump_factor_and_kept_tensors():
    assert jump_factor(100, 100) == 2.0 and jump_factor(3, 2) == pytest.approx(5 / 3)
    assert kept("model.layers.0.input_layernorm.weight", torch.float32)
    assert kept("model.norm.weight", torch.float32) and not kept("model.norm.weight", torch.float32, "extrapolate")
    assert not kept("model.layers.0.self_attn.q_proj.weight", torch.float32)
    assert kept("model.layers.0.mask", torch.int64, "extrapolate")
    half = jump(torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([2.0], dtype=torch.bfloat16), 2.0)
    assert half.dtype == torch.bfloat16 and half.item() == 3.0


@pytest.mark.parametrize("norms", ["copy", "extrapolate"])
def test_restart_loop_jump_on_hf_checkpoints_equals_formula(tmp_path, norms):
    model, _ = build_tiny_model(layers=1, hidden=16, heads=2, kv_heads=1, intermediate=32)
    anchor_state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    generator = torch.Generator().manual_seed(1)
    current_state = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in anchor_state.items()}
    save_state_dict(tmp_path / "a", anchor_state)
    save_state_dict(tmp_path / "b", current_state)
    (tmp_path / "b" / "config.json").write_text(json.dumps(model.config.to_dict()))
    out = extrapolate_checkpoint(tmp_path / "a", tmp_path / "b", tmp_path / "jump", jump_factor(4, 2), norms=norms)
    result = Checkpoint(out)
    assert (out / "config.json").is_file()
    for name, a in anchor_state.items():
        b = current_state[name].double().numpy()
        got = result.get(name).double().numpy()
        if norms == "copy" and "norm" in name:
            np.testing.assert_array_equal(got, b)
        else:
            np.testing.assert_allclose(got, a.double().numpy() + 1.5 * (b - a.double().numpy()), rtol=0, atol=1e-6)


def test_register_step_reads_verl_layout_and_sidecar(tmp_path):
    run = tmp_path / "run"
    step_dir = run / "verl_checkpoints" / "global_step_30"
    save_tiny_model(step_dir / "actor" / "huggingface", layers=1, hidden=16, heads=2, kv_heads=1, intermediate=32)
    assert hf_weights_dir(step_dir) == step_dir / "actor" / "huggingface"
    assert register_step(run, step_dir, step=50, grad_step=30, kind="rl")
    pending = run / "verl_checkpoints" / "global_step_40"
    pending.mkdir(parents=True)
    assert not register_step(run, pending, step=60, grad_step=40)  # FSDP shards only: registered after conversion
    assert json.loads((pending / "rlvrx_step.json").read_text()) == {"step": 60, "grad_step": 40, "kind": "rl"}
    traj = Trajectory.load(run)
    assert traj.steps == [50]
    entry = traj.get(50)
    assert entry.grad_step == 30 and entry.kind == "rl" and traj.resolve(entry) == (step_dir / "actor" / "huggingface").resolve()


def test_dry_run_writes_data_and_prints_the_command(tmp_path, capsys):
    pytest.importorskip("pyarrow", reason="writing verl parquet needs pyarrow")
    from rlvrx.backends.verl.launch import launch

    recipe = load_recipe(
        REPO / "recipes" / "quickstart.yaml", ["backend=verl", "sft.enabled=false", f"output.dir={tmp_path / 'run'}", "task.n_train=40", "task.n_test=8"]
    )
    assert launch(recipe, tmp_path / "run", dry_run=True) == 0
    text = capsys.readouterr().out
    assert "-m verl.trainer.main_ppo" in text and "algorithm.adv_estimator=grpo" in text
    assert "40 prompts" in text and "8 prompts" in text
    assert (tmp_path / "run" / "verl_data" / "train.parquet").is_file()
    assert (tmp_path / "run" / "base_model" / "config.json").is_file()  # the tiny model, saved for verl
    assert (tmp_path / "run" / "recipe.yaml").is_file()


FAKE_VERL = '''#!{python}
"""Stands in for `python -m verl.trainer.main_ppo OVERRIDES` in the restart-loop test: "trains" by moving
every float tensor of model.path by steps * 0.01 * D (D fixed), saves the last step with HF weights the
way verl does (global_step_N/actor/huggingface) and records it like rlvrx's checkpoint callback."""
import sys, json, torch
from pathlib import Path
from rlvrx.backends.verl.launch import register_step
from rlvrx.io.reader import Checkpoint
from rlvrx.io.writer import save_state_dict

args = dict(a.lstrip("+").split("=", 1) for a in sys.argv[3:])
with open(Path(args["rlvrx.run_dir"]) / "fake_calls.txt", "a") as log:
    log.write(" ".join(sys.argv[1:3]) + " " + args["actor_rollout_ref.model.path"] + "\\n")
steps = int(args["trainer.total_training_steps"])
src = args["actor_rollout_ref.model.path"]
with Checkpoint(src) as ckpt:
    state = {{n: ckpt.get(n) for n in ckpt.names()}}
gen = torch.Generator().manual_seed(0)
state = {{n: v + steps * 0.01 * torch.randn(v.shape, generator=gen) for n, v in state.items()}}
step_dir = Path(args["trainer.default_local_dir"]) / f"global_step_{{steps}}"
save_state_dict(step_dir / "actor" / "huggingface", state, source_dir=src)
off, eff = int(args["rlvrx.step_offset"]), int(args["rlvrx.effective_offset"])
register_step(args["rlvrx.run_dir"], step_dir, step=eff + steps, grad_step=off + steps)
'''


def test_restart_loop_runs_one_job_per_cycle_from_the_last_jump(tmp_path):
    pytest.importorskip("pyarrow", reason="writing verl parquet needs pyarrow")
    import sys

    from rlvrx.backends.verl.launch import prepare, restart_loop

    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_VERL.format(python=sys.executable))
    fake.chmod(0o755)
    run = tmp_path / "run"
    recipe = load_recipe(
        REPO / "recipes" / "quickstart.yaml",
        [
            "backend=verl",
            "sft.enabled=false",
            f"output.dir={run}",
            "task.n_train=16",
            "task.n_test=4",
            f"verl.python={fake}",
            "verl.rl_extra_mode=restart",
            "rl_extra={m: 4, n: 2, iterations: 3, optimizer_state: reset}",
        ],
    )
    plan = prepare(recipe, run)
    assert restart_loop(recipe, plan) == 0
    calls = (run / "fake_calls.txt").read_text().splitlines()
    jumps = [run / "verl_checkpoints" / "rl_extra" / f"jump_{c:04d}" for c in (1, 2, 3)]
    assert calls == [f"-m verl.trainer.main_ppo {path}" for path in (plan.model_path, jumps[0], jumps[1])]
    traj = Trajectory.load(run)
    assert [(e.step, e.grad_step or e.step, e.kind) for e in traj] == [
        (4, 4, "rl"),
        (6, 4, "extrapolated"),
        (10, 8, "rl"),
        (12, 8, "extrapolated"),
        (16, 12, "rl"),
        (18, 12, "extrapolated"),
    ]
    # Each jump is A_c + (m+n)/m (W_b - A_c) from that cycle's own start; norms copied from W_b.
    anchor = Checkpoint(plan.model_path)
    for c, jump_dir in enumerate(jumps, start=1):
        w_b = Checkpoint(run / "verl_checkpoints" / f"cycle_{c:04d}" / "global_step_4" / "actor" / "huggingface")
        got = Checkpoint(jump_dir)
        for name in got.names():
            expect = w_b.get(name) if "norm" in name else jump(anchor.get(name), w_b.get(name), 1.5)
            assert torch.equal(got.get(name), expect), (c, name)
        anchor = got
    assert restart_loop(recipe, plan) == 0  # rerun: every cycle is done, nothing runs again
    assert len((run / "fake_calls.txt").read_text().splitlines()) == 3


def test_reward_imports_a_dotted_task_only_when_the_recipe_names_it(tmp_path, monkeypatch):
    """A verl data row is data: its extra_info.task may name a registered task, or the recipe's own
    'module:function' task (passed on verl's command line), never other code to import."""
    from rlvrx.backends.verl.reward import task_of

    marker = tmp_path / "IMPORTED"
    (tmp_path / "probe_task_mod.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom rlvrx.tasks.arithmetic import ArithmeticTask\ndef make(**options):\n    return ArithmeticTask(**options)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("probe_task_mod:make", "os:system"):
        with pytest.raises(ValueError, match=rf"the data names task '{name}', code to import"):
            task_of("rlvrx/x", {"task": name}, recipe_task="arithmetic")
    assert not marker.exists()
    task = task_of("rlvrx/x", {"task": "probe_task_mod:make", "task_options": '{"digits": 2}'}, recipe_task="probe_task_mod:make")
    assert marker.exists() and task.reward("7", task.test_examples()[0]) in (0.0, 1.0)
    assert task_of("rlvrx/arithmetic", {}, recipe_task="probe_task_mod:make").name == "arithmetic"
    overrides = _overrides(load_recipe(REPO / "recipes" / "deepscaler-1.5b-grpo.yaml"))
    assert overrides["+reward.custom_reward_function.reward_kwargs.recipe_task"] == "math"


def test_a_second_verl_train_on_a_run_is_refused_while_the_first_holds_it(tmp_path):
    """`rlvrx train` with backend verl holds the run directory like the native trainer does."""
    import subprocess
    import sys

    run = tmp_path / "run"
    hold = "import sys, time\nfrom rlvrx.io.locks import run_locked\nwith run_locked(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        recipe = REPO / "recipes" / "deepscaler-1.5b-grpo.yaml"
        second = subprocess.run([sys.executable, "-m", "rlvrx", "train", str(recipe), f"output.dir={run}"], capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert second.returncode == 1, second.stderr
    assert second.stderr.strip() == f"error: run directory {run} is in use by pid {holder.pid} (lock {run}/.rlvrx.lock); wait for it to finish or stop it"
    assert not (run / "recipe.yaml").exists() and not (run / "verl_data").exists()  # nothing prepared
