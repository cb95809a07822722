"""`rlvrx snapshot convert` on real FSDP2 shard files, without verl (the main lane).

The shards come from torch's own FSDP2 (`fully_shard`) on a 2-rank gloo group, saved the way verl's
FSDPCheckpointManager saves them (each rank's `model.state_dict()` to model_world_size_2_rank_R.pt,
fsdp_config.json, huggingface/ with config and tokenizer): a tiny Qwen2 (tied embeddings) and a tiny
Gemma 4 (persistent 1-element `layer_scalar` buffers, verl PR 7610's case). Merged results are
compared with the tensors the models held before sharding.

    python tests/test_convert.py OUT   # the 2-rank job the fixture runs
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clirun import run_cli

from rlvrx.backends.verl.convert import convert_fsdp_checkpoint, load_shard, merge_entry
from rlvrx.io.reader import Checkpoint
from rlvrx.errors import CheckpointError, UsageError

WORLD = 2


def _models() -> dict:
    """{name: (model, tokenizer or None)}, the same on every rank (seeded)."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from rlvrx.tiny import build_tiny_model

    qwen = build_tiny_model(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=48, max_position=64, seed=0)
    torch.manual_seed(0)
    config = Gemma4TextConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=64,
        vocab_size_per_layer_input=97,
        hidden_size_per_layer_input=16,
        layer_types=["sliding_attention", "full_attention"],
    )
    gemma = Gemma4ForCausalLM(config)
    with torch.no_grad():
        for i, layer in enumerate(gemma.model.layers):
            layer.layer_scalar.fill_(0.5 + i)  # distinct values, so a wrong merge shows
    return {"qwen": qwen, "gemma": (gemma, None)}


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("fsdp",))
    for name, (model, tokenizer) in _models().items():
        model.config.architectures = [type(model).__name__]
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        actor = Path(out) / name / "global_step_3" / "actor"
        actor.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), actor / f"model_world_size_{WORLD}_rank_{rank}.pt")
        if rank == 0:
            torch.save(reference, Path(out) / name / "reference.pt")
            (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": WORLD}, indent=4))
            model.config.save_pretrained(actor / "huggingface")
            if tokenizer is not None:
                tokenizer.save_pretrained(actor / "huggingface")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    result = subprocess.run([sys.executable, __file__, str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _copy(job: Path, name: str, tmp_path: Path) -> Path:
    """A private copy of one model's step dir (tests that damage it)."""
    step = tmp_path / name / "global_step_3"
    shutil.copytree(job / name / "global_step_3", step)
    return step


def _assert_equals_reference(out: Path, reference: dict, dtype=torch.float32) -> None:
    with Checkpoint(out) as ckpt:
        names = ckpt.names()
        assert sorted(names) == sorted(k for k in reference if k != "lm_head.weight")  # the tied alias stored once
        for name in names:
            tensor = ckpt.get(name)
            assert tensor.dtype == dtype and torch.equal(tensor, reference[name].to(dtype)), name


def test_shard_files_are_fsdp2_dtensors_with_uneven_row_splits(job):
    shard = load_shard(job / "gemma" / "global_step_3" / "actor" / "model_world_size_2_rank_1.pt")
    embed = shard["model.embed_tokens.weight"]
    assert type(embed).__name__ == "DTensor" and tuple(embed.shape) == (97, 64)
    assert embed._local_tensor.shape == (48, 64)  # torch.chunk's split of 97 rows: 49 + 48
    scalar = shard["model.layers.1.layer_scalar"]
    assert type(scalar) is torch.Tensor and scalar.shape == (1,) and scalar.item() == 1.5  # a plain replicated buffer


@pytest.mark.parametrize("model", ["qwen", "gemma"])
def test_float32_merge_equals_the_tensors_before_sharding(job, model, tmp_path):
    reference = torch.load(job / model / "reference.pt")
    out = convert_fsdp_checkpoint(job / model / "global_step_3", out=tmp_path / "hf", dtype="float32")
    _assert_equals_reference(out, reference)
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)  # lm_head re-tied on load
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_default_is_bfloat16_into_the_step_dir_via_the_cli(job, tmp_path):
    from rlvrx.trajectory import Trajectory

    step = _copy(job, "qwen", tmp_path)
    result_code, result_out, result_err = run_cli("snapshot", "convert", str(step), "--run", str(tmp_path / "run"))
    assert result_code == 0, result_out + result_err
    _assert_equals_reference(step / "huggingface", torch.load(job / "qwen" / "reference.pt"), torch.bfloat16)
    assert Trajectory.load(tmp_path / "run").steps == [3]
    assert (step / "huggingface" / "tokenizer.json").is_file()
    again_code, again_out, again_err = run_cli("snapshot", "convert", str(step))
    assert again_code == 2 and "--overwrite" in again_err


def test_world_size_1_with_plain_tensors(job, tmp_path):
    """verl issue 903: a one-GPU run saves plain tensors, not DTensors."""
    actor = tmp_path / "global_step_1" / "actor"
    shutil.copytree(job / "qwen" / "global_step_3" / "actor" / "huggingface", actor / "huggingface")
    reference = torch.load(job / "qwen" / "reference.pt")
    torch.save(reference, actor / "model_world_size_1_rank_0.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
    _assert_equals_reference(convert_fsdp_checkpoint(actor, out=tmp_path / "hf", dtype="auto"), reference)


def test_missing_fsdp_config_takes_the_world_size_from_the_file_names(job, tmp_path):
    """verl issue 2252: `fsdp_config.json does not exist`."""
    step = _copy(job, "gemma", tmp_path)
    (step / "actor" / "fsdp_config.json").unlink()
    out = convert_fsdp_checkpoint(step, out=tmp_path / "hf", dtype="float32")
    _assert_equals_reference(out, torch.load(job / "gemma" / "reference.pt"))
    torch.save({}, step / "actor" / "model_world_size_4_rank_0.pt")  # files of another run beside them
    with pytest.raises(CheckpointError, match=r"no fsdp_config.json, and model shards of world sizes \[2, 4\]"):
        convert_fsdp_checkpoint(step, out=tmp_path / "hf2")


def test_replicated_buffers_are_taken_once_not_concatenated():
    """verl PR 7610: 0-d and 1-d plain tensors, identical on every rank, are buffers."""
    zero_d, one_d = torch.tensor(2.5), torch.tensor([0.75])
    assert merge_entry("scale", [zero_d, zero_d.clone()]).shape == ()
    assert torch.equal(merge_entry("layer_scalar", [one_d, one_d.clone()]), one_d)
    with pytest.raises(CheckpointError, match="layer_scalar: a plain .replicated. tensor that differs between rank 0 and rank 1"):
        merge_entry("layer_scalar", [one_d, torch.tensor([0.5])])


def test_ranks_disagreeing_on_a_buffer_are_refused(job, tmp_path):
    step = _copy(job, "gemma", tmp_path)
    rank1 = step / "actor" / "model_world_size_2_rank_1.pt"
    state = torch.load(rank1, weights_only=False)  # not mmap'ed: the file is rewritten below
    state["model.layers.0.layer_scalar"] = torch.tensor([9.0])
    torch.save(state, rank1)
    with pytest.raises(CheckpointError, match="model.layers.0.layer_scalar: .* differs between rank 0 and rank 1"):
        convert_fsdp_checkpoint(step, out=tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob("hf.tmp-*"))


def test_shards_that_do_not_fit_the_config_are_refused_before_anything_is_written(job, tmp_path):
    step = _copy(job, "qwen", tmp_path)
    config_path = step / "actor" / "huggingface" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate_proj.weight has shape \[48, 32\], the config's model has \[64, 32\]"):
        convert_fsdp_checkpoint(step, out=tmp_path / "hf")
    config.pop("layer_types", None)
    config_path.write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing model.layers.2.input_layernorm.weight, .* \(\+9 more\)"):
        convert_fsdp_checkpoint(step, out=tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob("hf.tmp-*"))


def test_a_failed_overwrite_keeps_the_previous_output(job, tmp_path):
    step = _copy(job, "qwen", tmp_path)
    out = convert_fsdp_checkpoint(step, out=tmp_path / "hf", dtype="float32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (step / "actor" / "model_world_size_2_rank_1.pt").unlink()
    with pytest.raises(CheckpointError, match=r"model_world_size_2_rank_1.pt: missing \(1 of 2 rank files absent\)"):
        convert_fsdp_checkpoint(step, out=out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


class _Payload:
    """Unpickling this runs `touch MARKER` (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_in_one_line(job, tmp_path):
    step = _copy(job, "qwen", tmp_path)
    marker = tmp_path / "MARKER"
    rank1 = step / "actor" / "model_world_size_2_rank_1.pt"
    torch.save({"model.norm.weight": torch.ones(2), "x": _Payload(marker)}, rank1)
    result = subprocess.run(
        [sys.executable, "-m", "rlvrx", "snapshot", "convert", str(step), "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert f"{rank1}: refused to unpickle" in result.stderr and "posix.system" in result.stderr
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_bad_paths_and_options_are_usage_errors(job, tmp_path):
    with pytest.raises(UsageError, match="no such verl checkpoint"):
        convert_fsdp_checkpoint(tmp_path / "nope")
    with pytest.raises(UsageError, match="not a verl FSDP checkpoint"):
        convert_fsdp_checkpoint(tmp_path)
    with pytest.raises(UsageError, match="dtype 'fp8'"):
        convert_fsdp_checkpoint(job / "qwen" / "global_step_3", out=tmp_path / "hf", dtype="fp8")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), sys.argv[1]), nprocs=WORLD, join=True)
