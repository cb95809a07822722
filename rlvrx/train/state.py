"""A trainer's checkpoints: the live model plus its trainer state (optimizer, scheduler, RNG, step
counters) saved atomically as checkpoints/step_N and registered in the trajectory; restored on resume."""

from __future__ import annotations

from pathlib import Path

import torch

from rlvrx.io.atomic import atomic_dir
from rlvrx.io.reader import Checkpoint, load_torch_file
from rlvrx.errors import RlvrxError
from rlvrx.trajectory import Trajectory

TRAINER_STATE = "trainer_state.pt"


def trainer_state(trainer) -> dict:
    return {
        "step": trainer.step,
        "grad_step": trainer.grad_step,
        "elapsed": trainer.elapsed,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }


def save_checkpoint(trainer, kind: str = "rl", extra_state: dict | None = None) -> Path:
    """Write the live model (and trainer state) as checkpoints/step_N, atomically, and register it."""
    out = trainer.rundir.checkpoint(trainer.step)
    with atomic_dir(out, overwrite=True) as tmp:
        trainer.model.save_pretrained(tmp)
        trainer.tokenizer.save_pretrained(tmp)
        torch.save({**trainer_state(trainer), **(extra_state or {})}, tmp / TRAINER_STATE)
    trainer.trajectory.add(trainer.step, out, kind=kind, replace=True, grad_step=trainer.grad_step)
    trainer.trajectory.save()
    return out


def latest_checkpoint(trajectory: Trajectory) -> Path | None:
    """The newest registered checkpoint that carries trainer state (where a rerun resumes)."""
    for entry in reversed(trajectory.entries):
        path = trajectory.resolve(entry)
        if (path / TRAINER_STATE).is_file():
            return path
    return None


def restore(trainer, path: Path) -> dict:
    """Load the weights and trainer state saved at `path` into the trainer; return the saved state."""
    model = trainer.model
    with Checkpoint(path) as ckpt:  # its headers checked: a damaged file is one line naming it
        state_dict = {name: ckpt.get(name).to(trainer.device) for name in ckpt.names()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RlvrxError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    state = load_torch_file(path / TRAINER_STATE, map_location=trainer.device)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    trainer.step = int(state["step"])
    trainer.grad_step = int(state["grad_step"])
    trainer.elapsed = float(state.get("elapsed", 0.0))
    return state
