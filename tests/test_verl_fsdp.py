"""A genuine verl FSDP2 checkpoint (2 gloo ranks on CPU, verl's apply_fsdp2 + FSDPCheckpointManager)
converted by `rlvrx snapshot convert` equals the trained model, and the RL-Extra jump applied to each
rank's local DTensor shards equals the full-tensor formula (the verl lane)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.verl
pytest.importorskip("verl", reason="needs verl: pip install 'verl[verl-core]==0.9.1' (the verl CI lane)")

import torch  # noqa: E402

from rlvrx.backends.verl.jump import kept  # noqa: E402
from rlvrx.formulas import jump  # noqa: E402
from rlvrx.io.reader import Checkpoint  # noqa: E402
from clirun import run_cli  # noqa: E402
from rlvrx.trajectory import Trajectory  # noqa: E402

JOB = Path(__file__).resolve().parent / "verl_fsdp_job.py"


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    from rlvrx.tiny import save_tiny_model

    root = tmp_path_factory.mktemp("fsdp")
    save_tiny_model(root / "base", layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
    result = subprocess.run([sys.executable, str(JOB), str(root / "base"), str(root / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "out"


def test_fsdp_checkpoint_is_verls_layout(job):
    actor = job / "global_step_1" / "actor"
    names = sorted(p.name for p in actor.iterdir())
    assert "fsdp_config.json" in names and "huggingface" in names
    assert {f"model_world_size_2_rank_{r}.pt" for r in (0, 1)} <= set(names)
    assert {f"optim_world_size_2_rank_{r}.pt" for r in (0, 1)} <= set(names)
    shard = torch.load(actor / "model_world_size_2_rank_1.pt", weights_only=False)
    embed = shard["model.embed_tokens.weight"]
    assert type(embed).__name__ == "DTensor" and embed._local_tensor.shape[0] < embed.shape[0]


def test_convert_float32_equals_the_trained_model_and_registers(job, tmp_path):
    reference = torch.load(job / "reference.pt")
    out, run = tmp_path / "hf32", tmp_path / "run"
    code, out_text, err = run_cli("snapshot", "convert", job / "global_step_1", "--out", out, "--dtype", "float32", "--run", run)
    assert code == 0, out_text + err
    ckpt = Checkpoint(out)
    # The tied lm_head is stored once, as save_pretrained does.
    assert sorted(ckpt.names()) == sorted(k for k in reference if k != "lm_head.weight")
    for name in ckpt.names():
        tensor = ckpt.get(name)
        assert tensor.dtype == torch.float32 and torch.equal(tensor, reference[name]), name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)  # lm_head re-tied on load
    traj = Trajectory.load(run)
    assert traj.steps == [1] and traj.path_of(1).resolve() == out.resolve()


def test_convert_default_is_verls_bfloat16_merge_into_step_dir(job):
    reference = torch.load(job / "reference.pt")
    code, out_text, err = run_cli("snapshot", "convert", job / "global_step_1", "--overwrite")
    assert code == 0, out_text + err
    ckpt = Checkpoint(job / "global_step_1" / "huggingface")
    for name in ckpt.names():
        assert torch.equal(ckpt.get(name), reference[name].bfloat16()), name
    # The default output is where `rlvrx snapshot scan` looks for converted verl steps.
    run = job.parent / "scanned"
    traj = Trajectory.load(run, create=True)
    traj.scan(job, hash=False)
    assert traj.steps == [1]
    code, _, err = run_cli("snapshot", "convert", job / "global_step_1")
    assert code == 2 and "pass --overwrite to replace it" in err


def test_shardwise_jump_equals_full_tensor_formula(job):
    saved = torch.load(job / "jump.pt")
    a, b, j, factor = saved["a"], saved["b"], saved["j"], saved["factor"]
    assert factor == pytest.approx(5 / 3)
    assert saved["stats"]["kept"] == 5 and saved["stats"]["jumped"] == len(a) - 5
    for name in a:
        if kept(name, a[name].dtype, "copy"):
            assert "norm" in name and torch.equal(j[name], b[name]), name
            continue
        # Each rank held only its rows ...
        assert saved["local_shapes"][name][0] < a[name].shape[0], name
        # ... and the gathered result is bit-identical to the jump of the full tensors,
        assert torch.equal(j[name], jump(a[name], b[name], factor)), name
        # which is W_a + (m+n)/m (W_b - W_a) (float64 reference), and moved the weights.
        expect = a[name].double().numpy() + (5 / 3) * (b[name].double().numpy() - a[name].double().numpy())
        np.testing.assert_allclose(j[name].double().numpy(), expect, rtol=0, atol=1e-6)
        assert not torch.equal(j[name], b[name]), name


def test_after_the_job_unconverted_steps_are_converted_and_registered(job, tmp_path):
    """launch's post-job pass: a step saved without hf_model gets `rlvrx snapshot convert` (float32) and
    enters the trajectory at the effective step its sidecar names."""
    import shutil

    from rlvrx.backends.verl.launch import register_run_checkpoints, register_step
    from rlvrx.config import load_recipe

    run = tmp_path / "run"
    step_dir = run / "verl_checkpoints" / "global_step_1"
    shutil.copytree(job / "global_step_1" / "actor", step_dir / "actor")
    assert not register_step(run, step_dir, step=3, grad_step=1)  # no HF weights yet: sidecar only
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml", ["backend=verl", "sft.enabled=false", f"output.dir={run}"])
    assert register_run_checkpoints(recipe, run, sys.executable) == [3]
    entry = Trajectory.load(run).get(3)
    assert entry.grad_step == 1 and Path(entry.path) == Path("verl_checkpoints/global_step_1/huggingface")
    reference = torch.load(job / "reference.pt")
    ckpt = Checkpoint(run / entry.path)
    assert all(torch.equal(ckpt.get(n), reference[n]) for n in ckpt.names())  # float32, as verl.checkpoint_dtype says
    assert register_run_checkpoints(recipe, run, sys.executable) == []  # idempotent
