"""sbatch scripts for rlvrx commands, and what a Slurm job tells a process about itself.

Two shapes:
  verl training (train, rl-extra): one job on N nodes. Ray's head starts on the first node of
    `scontrol show hostnames $SLURM_JOB_NODELIST`, a worker on each other node (srun -w NODE), the
    script waits until all N nodes have joined, then runs `rlvrx train RECIPE verl.nnodes=$SLURM_NNODES`
    on the head with RAY_ADDRESS exported, so verl's job runs on that cluster.
  analysis (linearity): a job array whose task I of K runs `--shard I/K` (from SLURM_ARRAY_TASK_ID and
    SLURM_ARRAY_TASK_COUNT), then a merge job submitted with --dependency=afterok:ARRAY_JOB.
  eval: one job on one node.
Scripts are written next to a submit.sh that submits them in order; `submit()` does the same.

Every value from the user reaches a script through `shell_word` (a shell line: shlex.quote) or
`sbatch_word` (an `#SBATCH` line, which sbatch splits itself, not a shell); nothing else writes
user text into a script.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlvrx.errors import ParameterError, RlvrxError, UsageError
from rlvrx.rundir import RunDir

COMMANDS = ("train", "rl-extra", "eval", "linearity")
RAY_PORT = 6379


# ----------------------------------------------------------------------------------------------
# Quoting: the one place user values enter a script


def shell_word(value: object) -> str:
    """VALUE as one shell word that expands to itself (no variables, no command substitution)."""
    return shlex.quote(str(value))


def check_line(value: object, name: str) -> str:
    """VALUE (of parameter `name`) as text for a one-line field, refusing line breaks and other control characters."""
    text = str(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ParameterError("{0}: {text!r} holds a line break or another control character; it cannot be written into an sbatch script", name, text=text)
    return text


def sbatch_word(value: object, what: str) -> str:
    r"""VALUE as one argument of an `#SBATCH` line.

    sbatch splits these lines itself (src/sbatch/opt.c `_get_argument`): whitespace separates
    arguments unless inside "..." (newer versions: also '...'), a backslash escapes the next character,
    an unescaped `#` outside quotes ends the line. So: no control characters (a newline would start
    a new script line); a value of only [A-Za-z0-9_@%+=:,./-] is written as is, any other goes inside double
    quotes with `\ " ' #` backslash-escaped, which every Slurm version reads back as VALUE.
    """
    text = check_line(value, what)
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", text):
        return text
    return '"' + re.sub(r'([\\"\'#])', r"\\\1", text) + '"'


def output_pattern(log_dir: Path, name: str = "out_dir") -> str:
    """A log directory (parameter `name`) inside sbatch's --output pattern: `%` doubled (sbatch expands
    %x, %A, ...), and no backslash (a backslash anywhere in the name turns the pattern expansion off)."""
    text = check_line(log_dir, name)
    if "\\" in text:
        raise ParameterError(
            "the log directory ({0}, default output.dir/slurm): {text!r} holds a backslash, which sbatch --output does not allow in a log path", name, text=text
        )
    return text.replace("%", "%%")


def job_name(command: str, run_dir: Path) -> str:
    """rlvrx-COMMAND-RUN with anything but letters, digits, `.`, `_`, `-` in RUN replaced by `_` (also a file name)."""
    return f"rlvrx-{command}-" + re.sub(r"[^A-Za-z0-9._-]", "_", run_dir.name or "run")


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    shards: int | None = None
    python: str = field(default_factory=lambda: sys.executable)
    sbatch_args: list[str] = field(default_factory=list)

    def check(self) -> None:
        for key, least in (("nodes", 1), ("gpus_per_node", 0), ("cpus_per_task", 1), ("shards", 1)):
            value = getattr(self, key)
            if value is not None and value < least:
                raise ParameterError("{0} must be >= {least}, got {value}", key, least=least, value=value)
        for key in ("partition", "time", "account"):
            if getattr(self, key) is not None:
                check_line(getattr(self, key), key)
        for arg in self.sbatch_args:
            check_line(arg, "sbatch_args")
            if not arg.startswith("-"):
                raise ParameterError("{0} {arg!r}: give one sbatch option per {0}, e.g. {0}=--qos=high", "sbatch_args", arg=arg)
        check_line(self.python, "python")


@dataclass
class Script:
    name: str
    path: Path
    text: str
    depends_on: str | None = None  # the name of the script whose jobs must succeed first


# ----------------------------------------------------------------------------------------------
# The environment of a Slurm job


def slurm_env(env: dict | None = None) -> dict | None:
    """SLURM_* facts about this process (None outside a Slurm job): job id, rank, tasks, nodes, array."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return None

    def number(key):
        value = env.get(key)
        return int(value) if value is not None and value.lstrip("-").isdigit() else None

    return {
        "job_id": env.get("SLURM_JOB_ID"),
        "procid": number("SLURM_PROCID"),
        "ntasks": number("SLURM_NTASKS"),
        "nnodes": number("SLURM_NNODES") or number("SLURM_JOB_NUM_NODES"),
        "nodelist": env.get("SLURM_JOB_NODELIST"),
        "array_task_id": number("SLURM_ARRAY_TASK_ID"),
        "array_task_count": number("SLURM_ARRAY_TASK_COUNT"),
        "array_task_min": number("SLURM_ARRAY_TASK_MIN"),
    }


def array_shard(env: dict | None = None) -> tuple[int, int] | None:
    """(I, N) for `--shard I/N` inside an array task: I counts from the array's first index."""
    info = slurm_env(env)
    if not info or info["array_task_id"] is None or info["array_task_count"] is None:
        return None
    first = info["array_task_min"] or 0
    return info["array_task_id"] - first, info["array_task_count"]


# ----------------------------------------------------------------------------------------------
# Rendering


def _header(opts: SlurmOptions, name: str, log_dir: Path, nodes: int, gpus: int, array: str | None = None) -> list[str]:
    log = output_pattern(log_dir)
    options = [
        f"--job-name={name}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--output={log}/%x-%A{'_%a' if array else ''}.out",
    ]
    if gpus > 0:
        options.append(f"--gpus-per-node={gpus}")
    if opts.cpus_per_task:
        options.append(f"--cpus-per-task={opts.cpus_per_task}")
    if array:
        options.append(f"--array={array}")
    for key in ("partition", "time", "account"):
        value = getattr(opts, key)
        if value:
            options.append(f"--{key}={value}")
    options += opts.sbatch_args
    lines = ["#!/bin/bash", *(f"#SBATCH {sbatch_word(o, 'an #SBATCH option')}" for o in options)]
    lines += ["", "set -euo pipefail", f"PY={shell_word(opts.python)}", ""]
    return lines


class Raw(str):
    """An argument written into the script as is (it holds shell variables such as $SLURM_NNODES)."""


def _rlvrx(args: list[str]) -> str:
    """`"$PY" -m rlvrx ARGS`: user arguments quoted, Raw ones left for the shell to expand."""
    return '"$PY" -m rlvrx ' + " ".join(a if isinstance(a, Raw) else shell_word(a) for a in args)


def render_verl_job(command: str, recipe: str, overrides: list[str], opts: SlurmOptions, log_dir: Path, name: str) -> str:
    """Ray head on the first node, workers on the rest, then the rlvrx command on the head."""
    gpus = opts.gpus_per_node
    ray_resources = f"--num-gpus={gpus} " if gpus else ""
    cpus = '--num-cpus="${SLURM_CPUS_PER_TASK:-$(nproc)}"'
    lines = _header(opts, name, log_dir, opts.nodes, gpus)
    lines += [
        "# Nodes of this job, one name per line (scontrol expands ranges like node[01-04]).",
        'mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'head_node="${nodes[0]}"',
        "head_ip=$(srun --nodes=1 --ntasks=1 -w \"$head_node\" hostname --ip-address | awk '{print $1}')",
        f'export RAY_ADDRESS="$head_ip:{RAY_PORT}"',
        'echo "Ray head: $head_node ($RAY_ADDRESS), ${#nodes[@]} node(s)"',
        "",
        f'srun --nodes=1 --ntasks=1 -w "$head_node" "$PY" -m ray.scripts.scripts start --head '
        f'--node-ip-address="$head_ip" --port={RAY_PORT} {ray_resources}{cpus} --block &',
        "sleep 10",
        "for ((i = 1; i < ${#nodes[@]}; i++)); do",
        f'    srun --nodes=1 --ntasks=1 -w "${{nodes[$i]}}" "$PY" -m ray.scripts.scripts start --address="$RAY_ADDRESS" {ray_resources}{cpus} --block &',
        "done",
        "",
        "# Wait until every node has joined the Ray cluster.",
        "for _ in $(seq 120); do",
        "    alive=$(\"$PY\" -c \"import ray; ray.init(address='auto', logging_level=40); print(sum(n['Alive'] for n in ray.nodes()))\" 2>/dev/null || echo 0)",
        '    [ "$alive" -ge "${#nodes[@]}" ] && break',
        "    sleep 5",
        "done",
        "",
        "# The driver runs on the head node next to Ray's head (--overlap: it shares the step's resources).",
        'srun --overlap --nodes=1 --ntasks=1 -w "$head_node" '
        + _rlvrx([command, recipe, *overrides, Raw('verl.nnodes="$SLURM_NNODES"'), f"verl.n_gpus_per_node={gpus}"]),
        "",
    ]
    return "\n".join(lines)


def render_single_job(args: list[str], opts: SlurmOptions, log_dir: Path, name: str) -> str:
    lines = _header(opts, name, log_dir, 1, opts.gpus_per_node)
    lines += [_rlvrx(args), ""]
    return "\n".join(lines)


def render_array_job(args: list[str], shards: int, opts: SlurmOptions, log_dir: Path, name: str) -> str:
    """Task I of the array runs ARGS --shard I/K (I from the array's first index)."""
    lines = _header(opts, name, log_dir, 1, opts.gpus_per_node, array=f"0-{shards - 1}")
    lines += [
        "shard=$((SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0}))",
        _rlvrx([*args, "--shard", Raw('"${shard}/${SLURM_ARRAY_TASK_COUNT}"')]),
        "",
    ]
    return "\n".join(lines)


def linearity_scripts(run_dir: Path, extra: list[str], opts: SlurmOptions, out_dir: Path, name: str) -> list[Script]:
    """`linearity weights RUN --shard I/K` as an array, then `linearity merge` of the K parts."""
    shards = opts.shards or 4
    parts_dir = RunDir(run_dir).linearity("weights")
    weights = ["linearity", "weights", str(run_dir), "--out", str(parts_dir), *extra]
    parts = [str(parts_dir / f"part-{i}-of-{shards}.json") for i in range(shards)]
    merge = ["linearity", "merge", *parts, "--json", str(RunDir(run_dir).linearity_parts_json("weights")), "--out", str(parts_dir)]
    cpu_opts = SlurmOptions(**{**opts.__dict__, "gpus_per_node": 0})
    return [
        Script(name, out_dir / f"{name}.sbatch", render_array_job(weights, shards, cpu_opts, out_dir, name)),
        Script(
            f"{name}-merge",
            out_dir / f"{name}-merge.sbatch",
            render_single_job(merge, cpu_opts, out_dir, f"{name}-merge"),
            depends_on=name,
        ),
    ]


def render_submit(scripts: list[Script]) -> str:
    """A shell script that submits the scripts in order, each after the one it depends on.

    Job ids live in job_0, job_1, ... (script names hold dots and dashes, which shell names cannot).
    """
    index = {s.name: i for i, s in enumerate(scripts)}
    lines = ["#!/bin/bash", "set -euo pipefail", 'cd "$(dirname "$0")"']
    for i, s in enumerate(scripts):
        dep = f'--dependency="afterok:${{job_{index[s.depends_on]}%%;*}}" ' if s.depends_on else ""
        lines.append(f"job_{i}=$(sbatch --parsable {dep}{shell_word(s.path.name)})")
        lines.append(f'echo {shell_word(s.name + ": job")} "${{job_{i}%%;*}}"')
    return "\n".join(lines) + "\n"


def build_scripts(command: str, recipe_source: str, overrides: list[str], run_dir: Path, extra: list[str], opts: SlurmOptions, out_dir: Path) -> list[Script]:
    opts.check()
    if command not in COMMANDS:
        raise ParameterError("{0} {value!r}: use one of {commands}", "command", value=command, commands=", ".join(COMMANDS))
    check_line(run_dir, "run_dir")
    check_line(out_dir, "out_dir")
    name = job_name(command, run_dir)
    if command in ("train", "rl-extra"):
        text = render_verl_job(command, recipe_source, overrides, opts, out_dir, name)
        return [Script(name, out_dir / f"{name}.sbatch", text)]
    if command == "linearity":
        return linearity_scripts(run_dir, extra, opts, out_dir, name)
    return [Script(name, out_dir / f"{name}.sbatch", render_single_job(["eval", *extra], opts, out_dir, name))]


def write_scripts(scripts: list[Script], out_dir: Path) -> Path:
    from rlvrx.io.atomic import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    submit_sh = out_dir / "submit.sh"
    for path, text in [*((s.path, s.text) for s in scripts), (submit_sh, render_submit(scripts))]:
        atomic_write_text(path, text)
        path.chmod(0o755)
    return submit_sh


def submit(scripts: list[Script], sbatch: str = "sbatch") -> dict[str, str]:
    """sbatch each script (with --dependency=afterok on the one it depends on); {name: job id}."""
    ids: dict[str, str] = {}
    for s in scripts:
        cmd = [sbatch, "--parsable"]
        if s.depends_on:
            cmd.append(f"--dependency=afterok:{ids[s.depends_on]}")
        cmd.append(str(s.path))
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, cwd=s.path.parent)
        except FileNotFoundError:
            raise UsageError(f"{sbatch}: not found; run on a Slurm login node, or submit {s.path.parent / 'submit.sh'} there") from None
        if result.returncode != 0:
            raise RlvrxError(f"sbatch {s.path.name} failed: {result.stderr.strip() or result.stdout.strip()}")
        ids[s.name] = result.stdout.strip().split(";")[0]
    return ids
