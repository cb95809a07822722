"""verl FSDP checkpoint shards -> a Hugging Face safetensors dir (torch and transformers only, no verl).

A verl step dir looks like `global_step_N/actor/{model_world_size_W_rank_R.pt, fsdp_config.json,
huggingface/ (config + tokenizer, + weights only when save_contents had hf_model)}`. Each rank's file
is its `model.state_dict()`: DTensors for what FSDP shards, plain tensors for what every rank holds in
full (buffers; every entry when a run had one rank, verl issue 903). The merge follows verl's
FSDPModelMerger: a DTensor's local shards are concatenated along its Shard(dim) (a replicated leading
dp/ddp mesh dim is dropped), a plain tensor is taken once after checking every rank holds the same
value (verl PR 7610: concatenating them breaks 0-d and 1-d buffers). Without fsdp_config.json (verl
issue 2252) the world size comes from the shard file names.

Shard files are read with torch.load(weights_only=True): tensors, DTensors and their mesh and
placements only (torch allows those once torch.distributed.tensor is imported); a pickle that would
run code is refused. The result is checked against the model the config describes (names, shapes,
float vs integer, built on the meta device by transformers) and streamed one tensor at a time into a
temporary dir, checked again as written, then renamed into place. Tied aliases (lm_head.weight when
tie_word_embeddings) are stored once, as save_pretrained does.

dtype "bfloat16" gives verl's merger's output; "float32" or "auto" (the dtype the shards hold, float32
for verl's actor) keep RL updates at lr 1e-6 that bfloat16 cannot resolve. Default output:
`global_step_N/huggingface`, which `rlvrx snapshot scan` picks up.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from rlvrx.io.reader import load_torch_file
from rlvrx.errors import CheckpointError, ParameterError, UsageError

DTYPES = ("bfloat16", "float32", "auto")
_STEP_DIR = re.compile(r"global_step_(\d+)$")
_SHARD = re.compile(r"model_world_size_(\d+)_rank_(\d+)\.pt$")
_TARGET = {"bfloat16": torch.bfloat16, "float32": torch.float32, "auto": None}


def _shard_files(directory: Path) -> dict[tuple[int, int], Path]:
    found = {}
    for path in directory.glob("model_world_size_*_rank_*.pt"):
        match = _SHARD.fullmatch(path.name)
        if match:
            found[int(match.group(1)), int(match.group(2))] = path
    return found


def actor_dir(path: str | Path) -> Path:
    """The dir holding the FSDP shards: PATH itself, or PATH/actor for a global_step_N dir."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such verl checkpoint directory")
    for candidate in (path, path / "actor"):
        if (candidate / "fsdp_config.json").is_file() or _shard_files(candidate):
            return candidate
    raise UsageError(
        f"{path}: not a verl FSDP checkpoint (no model_world_size_W_rank_R.pt here or in {path / 'actor'}); pass a global_step_N dir or its actor/ dir"
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


def shard_paths(actor: Path) -> list[Path]:
    """The model shard files of ranks 0..W-1, W from fsdp_config.json or, without it, the file names."""
    files = _shard_files(actor)
    config = actor / "fsdp_config.json"
    if config.is_file():
        try:
            world = json.loads(config.read_text())["world_size"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{config}: no world_size in it ({type(exc).__name__}: {exc})") from None
        if not isinstance(world, int) or world < 1:
            raise CheckpointError(f"{config}: world_size {world!r} is not a positive integer")
    else:
        sizes = sorted({w for w, _ in files})
        if len(sizes) != 1:
            raise CheckpointError(
                f"{actor}: no fsdp_config.json, and model shards of world sizes {sizes}; "
                "keep the files of one run only (or write fsdp_config.json with its world_size)"
            )
        world = sizes[0]
    missing = [r for r in range(world) if (world, r) not in files]
    if missing:
        raise CheckpointError(f"{actor / f'model_world_size_{world}_rank_{missing[0]}.pt'}: missing ({len(missing)} of {world} rank files absent)")
    return [files[world, r] for r in range(world)]


def load_shard(path: Path) -> dict:
    """One rank's state dict, unpickled with weights_only=True (tensors and DTensors, never code)."""
    import torch.distributed.tensor  # lets weights_only accept DTensor, DeviceMesh and placements

    mesh_log = logging.getLogger("torch.distributed.device_mesh")  # warns that no process group exists: none is needed
    level = mesh_log.level
    mesh_log.setLevel(logging.ERROR)
    try:
        state = load_torch_file(path, mmap=True)
    finally:
        mesh_log.setLevel(level)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CheckpointError(f"{path}: not a state dict (a {type(state).__name__})")
    odd = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise CheckpointError(f"{path}: entry {odd} is a {type(state[odd]).__name__}, not a tensor")
    return state


# ----------------------------------------------------------------------------------------------
# Merging one entry across ranks


def _ranks_and_placement(key: str, dtensor):
    """(ranks whose shards make up the tensor, in order; the placement along them)."""
    from torch.distributed.tensor import Replicate

    mesh = dtensor.device_mesh.mesh
    names = dtensor.device_mesh.mesh_dim_names or ()
    placements = tuple(dtensor.placements)
    if mesh.ndim == 1:
        return mesh.tolist(), placements[0]
    if mesh.ndim == 2 and names and names[0] in ("dp", "ddp") and isinstance(placements[0], Replicate):
        return mesh[0].tolist(), placements[1]  # HSDP: the first replica holds every shard
    raise CheckpointError(
        f"{key}: a DTensor on mesh {names} with placements {placements}; only FSDP (one sharded dim, optionally under a replicated dp dim) is supported"
    )


def merge_entry(key: str, parts: list) -> torch.Tensor:
    """The full tensor of one state-dict entry from every rank's piece of it."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    first = parts[0]
    if isinstance(first, DTensor):
        if not all(isinstance(p, DTensor) for p in parts):
            raise CheckpointError(f"{key}: a DTensor on some ranks and a plain tensor on others")
        ranks, placement = _ranks_and_placement(key, first)
        if max(ranks) >= len(parts):
            raise CheckpointError(f"{key}: its mesh names rank {max(ranks)}, but there are {len(parts)} rank files")
        locals_ = [parts[r]._local_tensor for r in ranks]
        if type(placement) is Shard:
            merged = torch.cat(locals_, dim=placement.dim)
        elif type(placement) is Replicate:
            merged = locals_[0]
        else:
            raise CheckpointError(f"{key}: placement {placement} cannot be merged (only Shard(dim) and Replicate)")
        if tuple(merged.shape) != tuple(first.shape):
            raise CheckpointError(f"{key}: the shards join to {list(merged.shape)}, but the DTensor is {list(first.shape)}")
        return merged
    if any(isinstance(p, DTensor) for p in parts):
        raise CheckpointError(f"{key}: a plain tensor on rank 0 and a DTensor on another rank")
    for rank, part in enumerate(parts[1:], start=1):
        if part.shape != first.shape or part.dtype != first.dtype or not torch.equal(part, first):
            raise CheckpointError(f"{key}: a plain (replicated) tensor that differs between rank 0 and rank {rank}")
    return first


# ----------------------------------------------------------------------------------------------
# What the config says the checkpoint must hold


def expected_structure(hf_dir: Path) -> tuple[dict[str, tuple[tuple[int, ...], bool]], dict[str, str]]:
    """({name: (shape, is_float)} of the model's state dict, {tied alias: the name stored}), from its
    config.json, by building the model on the meta device (no memory, no weights)."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(hf_dir)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        with torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # any failure of transformers here is the config's
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{hf_dir / 'config.json'}: transformers cannot build this model ({first}); pass --no-check to convert without checking names and shapes"
        ) from None
    expected = {name: (tuple(t.shape), t.is_floating_point()) for name, t in model.state_dict().items()}
    stored: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in stored:
            aliases[name] = stored[id(param)]
        else:
            stored[id(param)] = name
    return expected, aliases


def check_structure(found: dict[str, tuple[tuple[int, ...], bool]], expected, where: str) -> None:
    """Refuse (one line) a merged checkpoint whose names, shapes or kinds differ from the model's."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{f' (+{len(missing) - 3} more)' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}{f' (+{len(extra) - 3} more)' if len(extra) > 3 else ''}")
        raise CheckpointError(f"{where}: does not match the model its config.json describes: {'; '.join(parts)}")
    for name, (shape, is_float) in expected.items():
        got_shape, got_float = found[name]
        if got_shape != shape:
            raise CheckpointError(f"{where}: {name} has shape {list(got_shape)}, the config's model has {list(shape)}")
        if got_float != is_float:
            kind = "floating-point" if is_float else "integer"
            raise CheckpointError(f"{where}: {name} should be {kind} by the config's model")


# ----------------------------------------------------------------------------------------------
# Conversion


def convert_fsdp_checkpoint(
    path: str | Path,
    out: str | Path | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    max_shard_bytes: int = 4 << 30,
    check: bool = True,
) -> Path:
    """Write the HF checkpoint of a verl FSDP step dir to `out` (default: global_step_N/huggingface)."""
    from rlvrx.io.atomic import atomic_dir
    from rlvrx.io.reader import Checkpoint
    from rlvrx.io.writer import ShardedWriter, copy_aux_files

    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    actor = actor_dir(path)
    hf_dir = actor / "huggingface"
    out = Path(out) if out is not None else default_output(path)
    if out.resolve() == hf_dir.resolve():
        raise UsageError(f"{out}: that is verl's own huggingface/ dir (config + tokenizer); write the weights elsewhere")
    if out.exists() and not overwrite:
        raise ParameterError("{path} exists; pass {overwrite} to replace it", "overwrite=True", path=out)
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir}: no config.json; verl writes it with every checkpoint, so this one is incomplete")

    shards = [load_shard(p) for p in shard_paths(actor)]
    keys = sorted(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(keys):
            odd = sorted(set(shard) ^ set(keys))[0]
            raise CheckpointError(f"{actor}: rank {rank} and rank 0 hold different entries (e.g. {odd}): shards of different runs?")
    if any("lora_" in key for key in keys):
        raise UsageError(f"{actor}: LoRA checkpoints are not converted here; use `python -m verl.model_merger merge`")
    target = _TARGET[dtype]

    def out_dtype(value) -> torch.dtype:
        return target if target is not None and value.is_floating_point() else value.dtype

    if check:
        expected, aliases = expected_structure(hf_dir)
    else:
        expected, aliases = None, {}
    # A tied alias (lm_head.weight) is stored once, under the name the model keeps, after checking it matches.
    tied = {aliases[k]: k for k in keys if k in aliases and aliases[k] in shards[0]}
    names = [k for k in keys if k not in tied.values()]
    if expected is not None:
        found = {k: (tuple(shards[0][k].shape), shards[0][k].is_floating_point()) for k in names}
        check_structure(found, {k: v for k, v in expected.items() if k not in aliases}, str(actor))
    specs = [(k, tuple(shards[0][k].shape), out_dtype(shards[0][k])) for k in names]

    def tensors():
        for key in names:
            merged = merge_entry(key, [s.pop(key) for s in shards])
            if key in tied and not torch.equal(merge_entry(tied[key], [s.pop(tied[key]) for s in shards]), merged):
                raise CheckpointError(f"{tied[key]}: tied to {key} by the config, but the shards hold other values")
            yield key, merged.to(out_dtype(merged)).contiguous()

    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, specs, max_shard_bytes=max_shard_bytes)
        try:
            for name, tensor in tensors():
                writer.write(name, tensor)
            writer.finish()
        finally:
            writer.abort()
        copy_aux_files(hf_dir, tmp)
        (tmp / "config.json").write_text(_config_with_dtype(hf_dir / "config.json", {s[2] for s in specs}))
        with Checkpoint(tmp) as written:  # what is about to be renamed into place
            infos = written.infos()
            if {n: (tuple(i.shape), i.dtype) for n, i in infos.items()} != {k: (shape, dt) for k, shape, dt in specs}:
                raise CheckpointError(f"{out}: the written checkpoint differs from the merged tensors' names, shapes or dtypes")
    return out


def _config_with_dtype(config_path: Path, dtypes: set[torch.dtype]) -> str:
    """config.json with its dtype field naming the dtype actually written."""
    config = json.loads(config_path.read_text())
    floats = {d for d in dtypes if d.is_floating_point}
    if len(floats) == 1:
        name = str(next(iter(floats))).replace("torch.", "")
        key = "dtype" if "dtype" in config or "torch_dtype" not in config else "torch_dtype"
        config[key] = name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
