"""verl FSDP checkpoint shards -> a Hugging Face safetensors dir, merged by verl's own model merger.

A verl step dir looks like `global_step_N/actor/{model_world_size_W_rank_R.pt, fsdp_config.json,
huggingface/ (config + tokenizer, + weights only when save_contents had hf_model)}`. verl's
FSDPModelMerger finds the world size and device mesh and concatenates each DTensor's shards by
placement; it casts every tensor to bfloat16 on the way. With dtype="bfloat16" this module uses
exactly that merge; with "float32" or "auto" (the dtype the shards hold, float32 for verl's actor)
it runs the same per-placement merge without the cast, because RL updates at lr 1e-6 are far below
bfloat16's resolution and the linearity/extrapolation analyses need them.

The output is written atomically with rlvrx's streaming writer, tied aliases dropped with verl's
`drop_tied_target_keys`, config and tokenizer copied from `actor/huggingface`. Default output:
`global_step_N/huggingface`, which `rlvrx snapshot scan` picks up.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from rlvrx.errors import CheckpointError, UsageError

DTYPES = ("bfloat16", "float32", "auto")
_STEP_DIR = re.compile(r"global_step_(\d+)$")


def actor_dir(path: str | Path) -> Path:
    """The dir holding the FSDP shards: PATH itself, or PATH/actor for a global_step_N dir."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such verl checkpoint directory")
    for candidate in (path, path / "actor"):
        if (candidate / "fsdp_config.json").is_file():
            return candidate
    raise UsageError(
        f"{path}: not a verl FSDP checkpoint (no fsdp_config.json here or in {path / 'actor'}); "
        "pass a global_step_N dir or its actor/ dir"
    )


def step_of(path: str | Path) -> int | None:
    """N for a path inside .../global_step_N[/actor]."""
    for part in (Path(path).resolve(), *Path(path).resolve().parents):
        match = _STEP_DIR.search(part.name)
        if match:
            return int(match.group(1))
    return None


def default_output(path: str | Path) -> Path:
    actor = actor_dir(path)
    step_dir = actor.parent if actor.name == "actor" else actor
    return step_dir / "huggingface"


def _merger(actor: Path, out: Path):
    try:
        from verl.model_merger.base_model_merger import ModelMergerConfig
        from verl.model_merger.fsdp_model_merger import FSDPModelMerger
    except ImportError as exc:
        raise UsageError(
            f"converting FSDP shards uses verl's model merger, which is not importable here ({exc}); "
            "run in the environment that has verl (pip install 'verl[verl-core]==0.9.1')"
        ) from None
    hf_dir = actor / "huggingface"
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: no config.json; verl writes it with every checkpoint, so this one is incomplete")
    config = ModelMergerConfig(
        operation="merge", backend="fsdp", local_dir=str(actor), target_dir=str(out), hf_model_config_path=str(hf_dir)
    )
    return FSDPModelMerger(config)


def _merge_keeping_dtype(merger, world_size: int, total_shards: int, mesh_shape, mesh_dim_names) -> dict[str, torch.Tensor]:
    """verl's FSDPModelMerger._load_and_merge_state_dicts without its bfloat16 cast."""
    from torch.distributed.tensor import DTensor
    from verl.model_merger.fsdp_model_merger import merge_non_dtensor_shards

    if len(mesh_shape) != 1:
        raise CheckpointError("FSDP + tensor-parallel checkpoints are not supported (nor by verl's merger)")
    local_dir = Path(merger.config.local_dir)
    shards = []
    for rank in range(total_shards):
        path = local_dir / f"model_world_size_{world_size}_rank_{rank}.pt"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing shard {rank} of {total_shards}")
        shards.append(torch.load(path, map_location="cpu", weights_only=False))
    merged: dict[str, torch.Tensor] = {}
    for key in sorted(shards[0]):
        parts = [shard.pop(key) for shard in shards]
        if isinstance(parts[0], DTensor):
            placements = tuple(parts[0].placements)
            if mesh_dim_names[0] in ("dp", "ddp"):
                placements = placements[1:]
            merged[key] = merger._merge_by_placement([p._local_tensor for p in parts], placements[0])
        else:
            merged[key] = merge_non_dtensor_shards(key, parts)
    return merged


def merge_fsdp_shards(path: str | Path, dtype: str = "bfloat16") -> tuple[dict[str, torch.Tensor], object]:
    """(state dict, HF config) of a verl FSDP checkpoint, merged by verl's model merger."""
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    actor = actor_dir(path)
    merger = _merger(actor, actor / "huggingface")
    world_size = merger._get_world_size()
    rank0 = merger._load_rank_zero_state_dict(world_size)
    mesh, mesh_dim_names = merger._extract_device_mesh_info(rank0, world_size)
    del rank0
    total_shards, mesh_shape = merger._calculate_shard_configuration(mesh, mesh_dim_names)
    if dtype == "bfloat16":
        state = merger._load_and_merge_state_dicts(world_size, total_shards, mesh_shape, mesh_dim_names)
    else:
        state = _merge_keeping_dtype(merger, world_size, total_shards, mesh_shape, mesh_dim_names)
        if dtype == "float32":
            state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if any("lora_" in key for key in state):
        raise UsageError(f"{actor}: LoRA checkpoints are not converted here; use `python -m verl.model_merger merge`")
    _drop_tied_aliases(state, merger)
    return state, merger.model_config


def _drop_tied_aliases(state: dict, merger) -> None:
    from accelerate import init_empty_weights
    from verl.utils.transformers_compat import drop_tied_target_keys

    with init_empty_weights():
        model = merger.get_transformers_auto_model_class().from_config(merger.model_config)
    drop_tied_target_keys(state, model, merger.model_config)


def convert_fsdp_checkpoint(
    path: str | Path,
    out: str | Path | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    max_shard_bytes: int = 4 << 30,
) -> Path:
    """Write the HF checkpoint of a verl FSDP step dir to `out` (default: global_step_N/huggingface)."""
    from rlvrx.checkpoint import write_checkpoint

    actor = actor_dir(path)
    out = Path(out) if out is not None else default_output(path)
    if out.resolve() == (actor / "huggingface").resolve():
        raise UsageError(f"{out}: that is verl's own huggingface/ dir (config + tokenizer); write the weights elsewhere")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    state, _ = merge_fsdp_shards(actor, dtype=dtype)
    specs = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    config_text = _config_with_dtype(actor / "huggingface" / "config.json", state)
    return write_checkpoint(
        out,
        specs,
        ((name, state[name]) for name, _, _ in specs),
        source_dir=actor / "huggingface",
        max_shard_bytes=max_shard_bytes,
        overwrite=overwrite,
        extra_files={"config.json": config_text},
    )


def _config_with_dtype(config_path: Path, state: dict) -> str:
    """config.json with its dtype field naming the dtype actually written."""
    config = json.loads(config_path.read_text())
    floats = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(floats) == 1:
        name = str(next(iter(floats))).replace("torch.", "")
        key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
        config[key] = name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
