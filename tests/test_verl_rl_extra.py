"""The in-job RL-Extra schedule (rlvrx.backends.verl.rl_extra) driven like verl's fit loop drives it.

The trainer is RLExtraTrainer with verl's own _save_checkpoint/_load_checkpoint and PPOTrainerSync's
on_step_end; the worker is RLExtraWorker running its real jump on a small torch module with AdamW.
Only Ray's dispatch is replaced: a one-worker group that calls the worker's methods and saves /
loads its state dicts. Checked: the jump happens every m steps before the weights are pushed, equals
the formula from the right anchor (cycle start or step 0), the pre-jump state is always saved, the
effective/gradient step sidecars are right, and a job killed mid-cycle, between a cycle's last save
and its jump, or after a jump resumes to bit-identical weights."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.verl
pytest.importorskip("verl", reason="needs verl: pip install 'verl[verl-core]==0.9.1' (the verl CI lane)")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from rlvrx.backends.verl.callback import TrajectoryCallback  # noqa: E402
from rlvrx.formulas import jump  # noqa: E402
from rlvrx.backends.verl.rl_extra import RLExtraTrainer, RLExtraWorker  # noqa: E402

M, N, ITERATIONS, SAVE_FREQ = 3, 2, 3, 2


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)


class OneWorkerGroup:
    """verl's RayWorkerGroup reduced to one RLExtraWorker called in-process (ONE_TO_ALL -> [result])."""

    def __init__(self, net, optimizer):
        self.net, self.optimizer = net, optimizer
        self.worker = object.__new__(RLExtraWorker)
        self.worker.actor = SimpleNamespace(engine=SimpleNamespace(module=net, optimizer=optimizer))

    def rlvrx_snapshot_anchor(self):
        return [self.worker.rlvrx_snapshot_anchor()]

    def rlvrx_jump(self, *args):
        return [self.worker.rlvrx_jump(*args)]

    def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
        os.makedirs(local_path, exist_ok=True)
        torch.save({"model": self.net.state_dict(), "optim": self.optimizer.state_dict()}, os.path.join(local_path, "state.pt"))

    def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
        state = torch.load(os.path.join(local_path, "state.pt"))
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])


class Job:
    """One verl job: a fresh model (the base), optimizer, worker group and RLExtraTrainer."""

    def __init__(self, root, anchor="cycle_start", optimizer_state="keep"):
        self.net = Net()
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=0.05)
        self.pushed: list[int] = []
        config = OmegaConf.create(
            {
                "trainer": {
                    "default_local_dir": str(root / "ckpt"),
                    "resume_mode": "auto",
                    "resume_from_path": None,
                    "save_freq": SAVE_FREQ,
                    "default_hdfs_dir": None,
                    "del_local_ckpt_after_load": False,
                    "max_actor_ckpt_to_keep": None,
                    "max_critic_ckpt_to_keep": None,
                    "checkpoint_callback_class": None,
                },
                "actor_rollout_ref": {"actor": {"checkpoint": {"async_save": False}}},
                "rlvrx": {
                    "run_dir": str(root / "run"),
                    "step_offset": 0,
                    "effective_offset": 0,
                    "rl_extra": {"m": M, "n": N, "iterations": ITERATIONS, "norms": "copy", "optimizer_state": optimizer_state, "anchor": anchor},
                },
            }
        )
        t = object.__new__(RLExtraTrainer)
        t.config, t.use_critic, t.trainer_mode = config, False, "sync"
        t._read_schedule(config)
        t.actor_rollout_wg = OneWorkerGroup(self.net, self.optimizer)
        t.train_dataloader = SimpleNamespace(state_dict=lambda: {}, load_state_dict=lambda state: None)
        t.checkpoint_callback = TrajectoryCallback(config)
        t.checkpoint_manager = SimpleNamespace(update_weights=self.pushed.append, sleep_replicas=lambda: None)
        t.total_training_steps = M * ITERATIONS
        t.timing_raw = {}
        self.trainer = t

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.net.named_parameters()}

    def grad_step(self, step: int) -> None:
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        loss = (self.net.norm(self.net.lin(x)) - 1.0).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def fit(self, crash_after_save: int | None = None, trace: list | None = None) -> None:
        """verl's init (its _setup ends with _load_checkpoint: a fresh start or a resume), then its v1 fit
        loop: step, save (save_freq or last step), on_step_end (jump, then push weights)."""
        t = self.trainer
        t._load_checkpoint()
        for step in range(t.global_steps + 1, M * ITERATIONS + 1):
            t.global_steps = step
            self.grad_step(step)
            if step == M * ITERATIONS or step % SAVE_FREQ == 0:
                t._save_checkpoint()
            if step == crash_after_save:
                return
            before = self.state()
            t.on_step_end()
            if trace is not None:
                trace.append((step, before, self.state()))


def _sidecars(root):
    out = {}
    for path in sorted((root / "ckpt").rglob("rlvrx_step.json")):
        info = json.loads(path.read_text())
        out[path.parent.name] = (info["step"], info["grad_step"] if info["grad_step"] is not None else info["step"], info["kind"])
    return out


@pytest.mark.parametrize("anchor", ["cycle_start", "window"])
def test_jumps_follow_the_schedule_and_the_formula(tmp_path, anchor):
    job = Job(tmp_path, anchor=anchor)
    base = job.state()
    trace: list = []
    job.fit(trace=trace)
    jumps = [(step, before, after) for step, before, after in trace if step % M == 0]
    assert [s for s, _, _ in jumps] == [3, 6, 9] and job.trainer.rlvrx_jumps_done == ITERATIONS
    assert job.pushed == list(range(1, 10))  # weights pushed after every step, after the jump on cycle ends
    anchor_state = base
    for k, (step, before, after) in enumerate(jumps, start=1):
        span = k * M + (k - 1) * N
        factor = (M + N) / M if anchor == "cycle_start" else (span + N) / span
        origin = anchor_state if anchor == "cycle_start" else base
        for name in after:
            expect = before[name] if "norm" in name else jump(origin[name], before[name], factor)
            assert torch.equal(after[name], expect), (step, name)
        anchor_state = after
    for step, before, after in trace:
        if step % M:
            assert all(torch.equal(before[k], after[k]) for k in before)  # no jump mid-cycle
    # Every cycle end is saved before its jump (3 and 9 are not multiples of save_freq 2) and each jump
    # after it; step = effective step (gradient steps + n per earlier jump).
    assert _sidecars(tmp_path) == {
        "global_step_2": (2, 2, "rl"),
        "global_step_3": (3, 3, "rl"),
        "jump_0001": (5, 3, "extrapolated"),
        "global_step_4": (6, 4, "rl"),
        "global_step_6": (8, 6, "rl"),
        "jump_0002": (10, 6, "extrapolated"),
        "global_step_8": (12, 8, "rl"),
        "global_step_9": (13, 9, "rl"),
        "jump_0003": (15, 9, "extrapolated"),
    }
    marker = json.loads((tmp_path / "ckpt" / "rl_extra" / "jump_0002" / "rlvrx_jump.json").read_text())
    assert marker["effective_step"] == 10 and marker["grad_step"] == 6 and marker["max_abs_change"] > 0


@pytest.mark.parametrize("crash_after_save", [4, 6, 8])
@pytest.mark.parametrize("optimizer_state", ["keep", "reset", "rescale"])
def test_resume_is_bit_identical(tmp_path, crash_after_save, optimizer_state):
    """4: mid-cycle 2 (its anchor is jump 1); 6: after cycle 2's last save, before its jump; 8: after jump 2."""
    straight = Job(tmp_path / "straight", optimizer_state=optimizer_state)
    straight.fit()
    first = Job(tmp_path / "split", optimizer_state=optimizer_state)
    first.fit(crash_after_save=crash_after_save)
    second = Job(tmp_path / "split", optimizer_state=optimizer_state)
    second.fit()
    final, expect = second.state(), straight.state()
    assert all(torch.equal(final[k], expect[k]) for k in expect)
    assert second.trainer.rlvrx_jumps_done == ITERATIONS
    assert _sidecars(tmp_path / "split") == _sidecars(tmp_path / "straight")
