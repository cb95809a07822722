"""`rlvrx train RECIPE` with `backend: verl`: write the data, build the command, run it, register checkpoints.

    build_command(recipe, run_dir) -> [python, -m, verl.trainer.main_ppo, OVERRIDES...]
    launch(recipe, run_dir, dry_run) -> exit code

The job runs on the Ray cluster named by RAY_ADDRESS when it is set (verl's ray.init() joins it),
else on a local one that verl starts. RL-Extra runs inside the job (rlvrx.backends.verl.rl_extra)
or, with `verl.rl_extra_mode: restart`, as the restart loop: one verl job of m steps per cycle,
started from the previous jump's HF checkpoint, then the jump computed on HF checkpoints.

Checkpoints: verl's checkpoint callback (rlvrx.backends.verl.callback) registers each saved step
that has HF weights while the job runs; after the job, register_run_checkpoints converts the rest
(`rlvrx snapshot convert`, verl's model merger) and registers them, using the step sidecars the
callback wrote. None of this module imports verl, so the CPU install can dry-run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rlvrx.backends.verl.overrides import (
    GRPO_ENTRY,
    DataFiles,
    build_overrides,
    check_recipe,
    entry_module,
    override_key,
    run_paths,
    total_training_steps,
)
from rlvrx.errors import RlvrxError, UsageError
from rlvrx.io.locks import run_locked

STEP_SIDECAR = "rlvrx_step.json"
JUMPS_DIR = "rl_extra"
TRACKER = "latest_checkpointed_iteration.txt"  # verl's record of the step it resumes from
JUMP_MARKER = "rlvrx_jump.json"  # written by the in-job RL-Extra trainer once a jump is saved


@dataclass
class Plan:
    python: str
    module: str
    overrides: list[str]
    data: DataFiles
    model_path: Path | str
    run_dir: Path

    @property
    def command(self) -> list[str]:
        return [self.python, "-m", self.module, *self.overrides]


# ----------------------------------------------------------------------------------------------
# Trajectory registration


def hf_weights_dir(step_dir: str | os.PathLike) -> Path | None:
    """Where a verl step dir keeps HF weights: actor/huggingface (hf_model saved) or huggingface (converted)."""
    from rlvrx.io.reader import is_checkpoint_dir

    step_dir = Path(step_dir)
    for candidate in (step_dir / "actor" / "huggingface", step_dir / "huggingface", step_dir):
        if is_checkpoint_dir(candidate):
            return candidate
    return None


def register_step(run_dir, step_dir, step: int, grad_step: int | None = None, kind: str = "rl", register_now: bool = True) -> bool:
    """Record a saved verl step (sidecar json) and register its HF weights if present; True if registered."""
    from rlvrx.trajectory import Trajectory

    step_dir = Path(step_dir)
    grad = None if grad_step is None or grad_step == step else int(grad_step)
    sidecar = {"step": int(step), "grad_step": grad, "kind": kind}
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / STEP_SIDECAR).write_text(json.dumps(sidecar) + "\n")
    hf = hf_weights_dir(step_dir) if register_now else None
    if hf is None:
        return False
    traj = Trajectory.load(run_dir, create=True)
    traj.add(int(step), hf, kind=kind, hash=False, replace=True, grad_step=grad)
    traj.save()
    return True


def convert_command(python: str, step_dir: Path, dtype: str) -> list[str]:
    return [python, "-m", "rlvrx", "snapshot", "convert", str(step_dir), "--dtype", dtype]


def register_run_checkpoints(recipe, run_dir, python: str | None = None) -> list[int]:
    """After a job: convert steps that lack HF weights, register every step with a sidecar; returns new steps."""
    from rlvrx.trajectory import Trajectory

    python = python or recipe.verl.python or sys.executable
    paths = run_paths(recipe, run_dir)
    traj = Trajectory.load(paths["run_dir"], create=True)
    known = {e.step: traj.resolve(e) for e in traj}
    added = []
    for sidecar in sorted(paths["checkpoints"].rglob(STEP_SIDECAR)):
        info = json.loads(sidecar.read_text())
        step_dir = sidecar.parent
        step = int(info["step"])
        if step in known and known[step].exists():
            continue
        hf = hf_weights_dir(step_dir)
        if hf is None:
            result = subprocess.run(convert_command(python, step_dir, recipe.verl.checkpoint_dtype))
            if result.returncode != 0:
                raise RlvrxError(f"{step_dir}: converting the FSDP shards failed (exit {result.returncode})")
            hf = hf_weights_dir(step_dir)
        if hf is None:
            raise RlvrxError(f"{step_dir}: no HF weights after conversion")
        traj.add(step, hf, kind=info.get("kind", "rl"), hash=False, replace=True, grad_step=info.get("grad_step"))
        added.append(step)
    traj.save()
    return added


# ----------------------------------------------------------------------------------------------
# Resuming


def latest_saved_step(checkpoint_dir) -> int | None:
    """The step verl's resume_mode=auto will start after (its tracker file), or None before any save.

    verl reads the tracker and, when the global_step_N it names is missing, trains from step 0 over
    the run without a word; here that is an error instead.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tracker = checkpoint_dir / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    try:
        step = int(text)
    except ValueError:
        raise RlvrxError(f"{tracker}: holds {text!r}, not a step number; fix or remove it to resume") from None
    if not (checkpoint_dir / f"global_step_{step}").is_dir():
        raise RlvrxError(
            f"{tracker} names step {step}, but {checkpoint_dir / f'global_step_{step}'} is missing, and verl would "
            "silently train again from step 0; restore that dir or write the last step that exists into the tracker"
        )
    return step


def _overridden(recipe, key: str) -> str | None:
    """The value the recipe's verl.overrides give `key` (the last one wins), or None."""
    value = None
    for item in recipe.verl.overrides:
        if "=" in item and override_key(item) == key:
            value = item.split("=", 1)[1].strip()
    return value


def resume_point(recipe, run_dir) -> tuple[int | None, int, bool]:
    """(the saved step the job resumes from, or None; the job's total steps; whether it has work left).

    An in-job RL-Extra run saved at its last step still has work when that step's jump is not saved
    (the trainer redoes it on resume).
    """
    total = _overridden(recipe, "trainer.total_training_steps")
    total = int(total) if total not in (None, "null") else total_training_steps(recipe)
    if (_overridden(recipe, "trainer.resume_mode") or "auto") != "auto":
        return None, total, True
    checkpoints = run_paths(recipe, run_dir)["checkpoints"]
    saved = latest_saved_step(checkpoints)
    if saved is None or saved < total:
        return saved, total, True
    if recipe.rl_extra is not None and recipe.verl.rl_extra_mode == "in_process":
        last_jump = checkpoints / JUMPS_DIR / f"jump_{saved // recipe.rl_extra.m:04d}" / JUMP_MARKER
        return saved, total, saved % recipe.rl_extra.m == 0 and not last_jump.is_file()
    return saved, total, False


# ----------------------------------------------------------------------------------------------
# Preparing and launching


def base_model_path(recipe, run_dir) -> Path | str:
    """model.path (a local dir, made absolute, or a hub id left as is), or the recipe's tiny model
    saved under RUN/base_model (built once)."""
    if recipe.model.path:
        local = Path(recipe.model.path).expanduser()
        return local.resolve() if local.exists() else recipe.model.path
    from rlvrx.io.reader import is_checkpoint_dir
    from rlvrx.tiny import save_tiny_model

    out = run_paths(recipe, run_dir)["base_model"]
    if not is_checkpoint_dir(out):
        save_tiny_model(out, overwrite=out.exists(), **recipe.model.tiny.model_dump())
    return out


def prepare(recipe, run_dir) -> Plan:
    """Validate the recipe for verl, write data files and the resolved recipe; the command to run."""
    from rlvrx.backends.verl.data import write_verl_data
    from rlvrx.io.atomic import atomic_write_text
    from rlvrx.config import recipe_to_yaml
    from rlvrx.rundir import RunDir

    check_recipe(recipe)
    paths = run_paths(recipe, run_dir)
    paths["run_dir"].mkdir(parents=True, exist_ok=True)
    model_path = base_model_path(recipe, run_dir)
    data = write_verl_data(recipe, paths["data_dir"])
    atomic_write_text(RunDir(paths["run_dir"]).recipe, recipe_to_yaml(recipe))
    overrides = build_overrides(recipe, run_dir, data, model_path)
    return Plan(
        python=recipe.verl.python or sys.executable,
        module=entry_module(recipe),
        overrides=overrides,
        data=data,
        model_path=model_path,
        run_dir=paths["run_dir"],
    )


def build_command(recipe, run_dir) -> list[str]:
    """The full command line of the verl job (writes the data files on the way)."""
    return prepare(recipe, run_dir).command


def format_command(command: list[str]) -> str:
    head = shlex.join(command[:3])
    return " \\\n    ".join([head, *(shlex.quote(arg) for arg in command[3:])])


def _check_verl(python: str) -> None:
    if python == sys.executable:
        found = importlib.util.find_spec("verl") is not None
    else:
        try:
            found = subprocess.run([python, "-c", "import verl"], capture_output=True).returncode == 0
        except OSError:
            found = False
    if not found:
        raise UsageError(
            f"verl is not importable by {python}; install it there (pip install 'verl[verl-core]==0.9.1' plus "
            "vLLM on GPU nodes) or point verl.python at an interpreter that has it"
        )


def _chat_template_note(model_path) -> str | None:
    """verl renders every prompt through the tokenizer's chat template; say so when a local model has none."""
    path = Path(model_path)
    config = path / "tokenizer_config.json"
    if not config.is_file() or (path / "chat_template.jinja").is_file():
        return None
    try:
        has_template = bool(json.loads(config.read_text()).get("chat_template"))
    except (json.JSONDecodeError, OSError):
        return None
    return None if has_template else f"{path} has no chat template, and verl renders every prompt through one"


def _ray_note() -> str:
    from rlvrx.backends.slurm import slurm_env

    address = os.environ.get("RAY_ADDRESS")
    if address:
        return f"Ray cluster: {address} (RAY_ADDRESS)"
    slurm = slurm_env()
    if slurm and (slurm["nnodes"] or 1) > 1:
        return (
            f"Ray cluster: a local one on this node only, though Slurm job {slurm['job_id']} has {slurm['nnodes']} nodes; "
            "`rlvrx slurm RECIPE --nodes N` renders a job that starts Ray across them"
        )
    return "Ray cluster: a local one, started by verl"


def launch(recipe, run_dir, dry_run: bool = False) -> int:
    """Dry run: print the command and the data files. Else run the job(s), then register checkpoints,
    holding the run directory (a second train or rl-extra on it is refused at once)."""
    restart = recipe.rl_extra is not None and recipe.verl.rl_extra_mode == "restart"
    if not dry_run:
        with run_locked(run_dir):
            plan = prepare(recipe, run_dir)
            _check_verl(plan.python)
            return _launch(recipe, plan, restart)
    plan = prepare(recipe, run_dir)
    print(format_command(plan.command))
    print(f"# data: {plan.data.train} ({plan.data.n_train} prompts), {plan.data.val} ({plan.data.n_val} prompts)")
    print(f"# model: {plan.model_path}")
    note = _chat_template_note(plan.model_path)
    if note:
        print(f"# warning: {note}")
    if restart:
        print(f"# RL-Extra restart loop: {recipe.rl_extra.iterations} jobs like this one, {recipe.rl_extra.m} steps each, each started from the previous jump")
    print(f"# {_ray_note()}")
    return 0


def _launch(recipe, plan: Plan, restart: bool) -> int:
    print(_ray_note(), flush=True)
    _register_base(recipe, plan)
    if restart:
        return restart_loop(recipe, plan)
    saved, total, work_left = resume_point(recipe, plan.run_dir)
    checkpoints = run_paths(recipe, plan.run_dir)["checkpoints"]
    if not work_left:
        more = "rl_extra.iterations" if recipe.rl_extra is not None else "grpo.steps"
        print(
            f"Nothing to train: {checkpoints / f'global_step_{saved}'} is step {saved}, and the job trains {total} steps; raise {more} to train further",
            flush=True,
        )
        register_run_checkpoints(recipe, plan.run_dir, plan.python)
        return 0
    if saved is not None:
        todo = f"steps {saved + 1} to {total}" if saved < total else f"the jump after step {saved}"
        print(f"Resuming from {checkpoints / f'global_step_{saved}'}: {todo}", flush=True)
    code = subprocess.call(plan.command, cwd=plan.run_dir)
    register_run_checkpoints(recipe, plan.run_dir, plan.python)
    return code


def _register_base(recipe, plan: Plan) -> None:
    from rlvrx.io.reader import is_checkpoint_dir
    from rlvrx.trajectory import Trajectory

    if not is_checkpoint_dir(Path(plan.model_path)):
        return  # a hub id: verl downloads it; register the local copy with `rlvrx snapshot add RUN PATH --step 0 --kind base`
    traj = Trajectory.load(plan.run_dir, create=True)
    if 0 not in traj.steps:
        traj.add(0, plan.model_path, kind="base", hash=False)
        traj.save()


def restart_loop(recipe, plan: Plan) -> int:
    """RL-Extra as one verl job per cycle (the paper's own scripts restart the whole job each cycle).

    Cycle c trains m steps from anchor A_c (the base model, then each jump's HF checkpoint) into
    RUN/verl_checkpoints/cycle_c, and the jump A_{c+1} = A_c + ((m+n)/m)(W_b - A_c) (anchor=window:
    from the base model along the whole drift) is written to RUN/verl_checkpoints/rl_extra/jump_c. Finished cycles are skipped on rerun; an interrupted cycle
    resumes from its own checkpoints. Each cycle starts a fresh optimizer and shuffles with seed+c.
    """
    from rlvrx.backends.verl.jump import extrapolate_checkpoint, jump_factor

    rx = recipe.rl_extra
    m, n = rx.m, rx.n
    paths = run_paths(recipe, plan.run_dir)
    anchor = plan.model_path
    for cycle in range(1, rx.iterations + 1):
        jump_dir = paths["checkpoints"] / JUMPS_DIR / f"jump_{cycle:04d}"
        if hf_weights_dir(jump_dir) is not None:
            anchor = hf_weights_dir(jump_dir)
            continue
        cycle_dir = paths["checkpoints"] / f"cycle_{cycle:04d}"
        overrides = build_overrides(
            recipe,
            plan.run_dir,
            plan.data,
            anchor,
            total_steps=m,
            checkpoint_dir=cycle_dir,
            step_offset=(cycle - 1) * m,
            effective_offset=(cycle - 1) * (m + n),
            rl_extra=False,
            data_seed=recipe.grpo.seed + cycle - 1,
        )
        print(f"RL-Extra cycle {cycle}/{rx.iterations}: {m} steps from {anchor}", flush=True)
        code = subprocess.call([plan.python, "-m", GRPO_ENTRY, *overrides], cwd=plan.run_dir)
        register_run_checkpoints(recipe, plan.run_dir, plan.python)
        if code != 0:
            return code
        current = hf_weights_dir(cycle_dir / f"global_step_{m}")
        if current is None:
            raise RlvrxError(f"{cycle_dir / f'global_step_{m}'}: the cycle's last checkpoint has no HF weights")
        if rx.anchor == "window":  # from step 0 along the whole drift: W_0 + ((S + n) / S)(W_b - W_0)
            span = cycle * m + (cycle - 1) * n
            origin, factor = plan.model_path, (span + n) / span
        else:
            origin, factor = anchor, jump_factor(m, n)
        extrapolate_checkpoint(origin, current, jump_dir, factor, norms=rx.norms, overwrite=True)
        register_step(plan.run_dir, jump_dir, step=cycle * (m + n), grad_step=cycle * m, kind="extrapolated")
        anchor = jump_dir
    return 0
