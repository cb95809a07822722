"""A genuine 2-rank verl FSDP2 job on CPU (gloo), for tests/test_verl_fsdp.py.

    python tests/verl_fsdp_job.py BASE_MODEL_DIR OUT_DIR

Each rank loads the tiny model, shards it with verl's `apply_fsdp2` on a ("fsdp",) mesh like verl's
FSDP engine, takes one AdamW step and saves with verl's FSDPCheckpointManager to
OUT/global_step_1/actor. Rank 0 writes the gathered full state dict to OUT/reference.pt. Then the
RL-Extra jump runs shard-wise: the anchor is snapshotted (rlvrx's snapshot_local), two more steps
move the weights to W_b, and apply_jump_local jumps each rank's local shards; the gathered W_a, W_b
and jumped tensors go to OUT/jump.pt for the test to compare with the full-tensor formula.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

M, N = 3, 2  # the jump factor (m + n) / m of this job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full(model) -> dict[str, torch.Tensor]:
    """Gathered full tensors of every parameter (a collective: every rank calls it)."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def _step(model, optimizer, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def worker(rank: int, world: int, port: int, base: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager
    from verl.utils.fsdp_utils import apply_fsdp2

    from rlvrx.backends.verl.jump import apply_jump_local, jump_factor, snapshot_local

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base)
    apply_fsdp2(model, {"mesh": mesh, "reshard_after_forward": True}, {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(rank))
    _step(model, optimizer, ids)

    manager = FSDPCheckpointManager(
        model=model,
        optimizer=optimizer,
        lr_scheduler=None,
        processing_class=tokenizer,
        checkpoint_config=OmegaConf.create({"save_contents": ["model", "optimizer", "extra"], "load_contents": ["model"]}),
    )
    manager.save_checkpoint(local_path=os.path.join(out, "global_step_1", "actor"), global_step=1)
    reference = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(reference, os.path.join(out, "reference.pt"))

    full_a = _full(model)
    anchor = snapshot_local(model)
    for _ in range(2):
        _step(model, optimizer, ids)
    full_b = _full(model)
    local_shapes = {name: tuple(t.shape) for name, t in anchor.items()}
    stats = apply_jump_local(model, anchor, jump_factor(M, N), norms="copy")
    full_j = _full(model)
    if rank == 0:
        torch.save(
            {"a": full_a, "b": full_b, "j": full_j, "factor": jump_factor(M, N), "stats": stats, "local_shapes": local_shapes}, os.path.join(out, "jump.pt")
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    base_dir, out_dir = sys.argv[1], sys.argv[2]
    mp.spawn(worker, args=(2, _free_port(), base_dir, out_dir), nprocs=2, join=True)
