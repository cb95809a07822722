"""Test support for tests/test_verl_e2e.py: the tiny model, the recipe, the environment, and a runner
that never hangs.

verl on CPU needs the plugin beside this file (rlvrx_verl_cpu), a few environment variables and
the CPU overrides below, which travel in the recipe's `verl.overrides` like any user's. A vLLM
worker that fails makes a verl job hang rather than exit, so every command runs in its own process
group under a timeout; on timeout the group and every process that inherited this run's marker
variable (Ray's daemons and workers leave the group) are killed, and the caller fails with the log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
# vLLM-CPU serves head size 32: hidden / heads = 64 / 2.
MODEL = dict(layers=2, hidden=64, heads=2, kv_heads=2, intermediate=128, max_position=64, seed=0)
MARKER = "RLVRX_E2E_RUN"

CPU_OVERRIDES = [
    "trainer.device=cpu",
    "data.dataloader_num_workers=0",
    "+ray_kwargs.ray_init.num_gpus=1",
    "+ray_kwargs.ray_init.num_cpus=16",
    "+ray_kwargs.ray_init.include_dashboard=False",
    "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
    "+actor_rollout_ref.rollout.enable_sleep_mode=False",
    "actor_rollout_ref.model.enable_gradient_checkpointing=False",
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
    "actor_rollout_ref.rollout.enforce_eager=True",
    "actor_rollout_ref.rollout.dtype=float32",
    "actor_rollout_ref.rollout.max_num_seqs=16",
    "actor_rollout_ref.rollout.max_model_len=64",
    "actor_rollout_ref.rollout.max_num_batched_tokens=256",
    "actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes=64",
    "actor_rollout_ref.rollout.agent.num_workers=1",
    "reward.num_workers=1",
    "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    f"reward.custom_reward_function.path={HERE / 'shaped_reward.py'}",
    "reward.custom_reward_function.name=compute_score",
]


def save_model(out: Path) -> Path:
    """The tiny Qwen2 with a chat template (verl renders every prompt through one)."""
    from rlvrx.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(**MODEL)
    tokenizer.chat_template = CHAT_TEMPLATE
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_recipe(path: Path, model: Path, run_dir: Path, steps: int, rl_extra: dict | None = None, extra_overrides: list[str] = ()) -> Path:
    recipe = {
        "backend": "verl",
        "model": {"path": str(model)},
        "task": {"name": "arithmetic", "digits": 1, "operators": ["+"], "n_train": 64, "n_test": 16, "seed": 0},
        "sft": {"enabled": False},
        "grpo": {
            "num_generations": 4,
            "batch_size": 4,
            "lr": 5e-3,
            "epsilon": 0.2,
            "beta": 0.0,
            "max_new_tokens": 8,
            "temperature": 1.0,
            "steps": steps,
            "save_every": 2,
            "eval_every": 2,
            "seed": 0,
        },
        "verl": {
            "n_gpus_per_node": 1,
            "gpu_memory_utilization": 0.1,
            "max_prompt_length": 16,
            "micro_batch_size_per_gpu": 8,
            "logger": ["console"],
            "overrides": [*CPU_OVERRIDES, *extra_overrides],
        },
        "output": {"dir": str(run_dir)},
    }
    if rl_extra:
        recipe["rl_extra"] = rl_extra
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    env.update(
        VERL_USE_EXTERNAL_MODULES="rlvrx_verl_cpu",
        VERL_PLATFORM="cpu",
        VERL_ENGINE_DEVICE="cuda",  # verl registers its FSDP engine for "cuda" and "npu" only
        TORCH_COMPILE_DISABLE="1",
        TORCHINDUCTOR_DISABLE="1",
        VLLM_CPU_OMP_THREADS_BIND="nobind",
        VLLM_CPU_KVCACHE_SPACE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env[MARKER] = uuid.uuid4().hex
    return env


def _marked_pids(token: str) -> list[int]:
    """Processes whose environment carries this run's marker (this user's only)."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_run(proc: subprocess.Popen, token: str) -> None:
    """SIGKILL the command's process group and every process with its marker."""
    with _suppress():
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in _marked_pids(token):
        with _suppress():
            os.kill(pid, signal.SIGKILL)
    with _suppress():
        proc.wait(timeout=30)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError, subprocess.TimeoutExpired))


def run_rlvrx(args: list[str], log: Path, cwd: Path, timeout: float, stop_when=None, poll: float = 2.0, env: dict[str, str] | None = None):
    """Run `python -m rlvrx ARGS` with the CPU environment, output to `log`.

    Returns (exit code or None when stopped, log text). `stop_when()` is polled; once true the run is
    killed (SIGKILL, like a lost node), which is how the resume test interrupts training. A run that
    outlives `timeout` is killed and reported as a TimeoutError carrying the log tail.
    """
    env = {**environment(), **(env or {})}
    token = env[MARKER]
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlvrx", *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        code, stopped = None, False
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    break
                if stop_when is not None and stop_when():
                    stopped = True
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"`rlvrx {' '.join(args)}` still running after {timeout:.0f} s; log tail:\n" + log_tail(log))
                time.sleep(poll)
        finally:
            kill_run(proc, token)  # also reaps Ray daemons a finished job leaves behind
    return (None if stopped else code), log.read_text(errors="replace")


def log_tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:]
