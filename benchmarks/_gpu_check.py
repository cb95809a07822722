"""Support for benchmarks/gpu_check.sh: the tiny verl recipes, the RL-Extra jump check, the summary.

    python _gpu_check.py recipe OUT --model DIR --run RUN --steps 4 [--rl-extra M N] [--override O]...
    python _gpu_check.py jump RUN --m 2 --n 2 --json OUT      (needs torch and rlvrx)
    python _gpu_check.py summary WORK                         (standard library only)

Imported by verl itself (VERL_USE_EXTERNAL_MODULES=_gpu_check, this dir on PYTHONPATH), it
makes verl's rollout tokenization use its default builder for rlvrx's character tokenizer
(tests/verl_cpu/tiny_tokenizer.py). The reward is tests/verl_cpu/shaped_reward.py: rlvrx's verifier
plus a dense shaping term, so a random tiny model gets a signal and its weights move.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Overrides for a tiny model on one GPU: no flash-attn in verl[verl-core] (sdpa), no CUDA graphs or
# compiles (start-up time), one worker per pool, the shaping reward below.
GPU_OVERRIDES = [
    "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
    "+ray_kwargs.ray_init.include_dashboard=False",
    "actor_rollout_ref.model.enable_gradient_checkpointing=False",
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
    "actor_rollout_ref.rollout.enforce_eager=True",
    "actor_rollout_ref.rollout.agent.num_workers=1",
    "reward.num_workers=1",
    "data.dataloader_num_workers=0",
    f"reward.custom_reward_function.path={Path(__file__).resolve().parents[1] / 'tests' / 'verl_cpu' / 'shaped_reward.py'}",
    "reward.custom_reward_function.name=compute_score",
]


SUPPORT = Path(__file__).resolve().parents[1] / "tests" / "verl_cpu"  # shared with the CPU lane's plugin

if "verl" in sys.modules:  # imported by verl through VERL_USE_EXTERNAL_MODULES
    sys.path.insert(0, str(SUPPORT))
    from tiny_tokenizer import patch_continuous_token

    patch_continuous_token()


# ----------------------------------------------------------------------------------------------
# recipe


def recipe(args) -> None:
    """A verl recipe (written as JSON, which YAML reads) modelled on recipes/deepscaler-1.5b-grpo.yaml, tiny."""
    body = {
        "description": "GPU check: tiny GRPO on verl (benchmarks/gpu_check.sh)",
        "backend": "verl",
        "model": {"path": str(Path(args.model).resolve())},
        "task": {"name": "arithmetic", "digits": 1, "operators": ["+"], "n_train": 64, "n_test": 16, "seed": 0},
        "sft": {"enabled": False},
        "grpo": {
            "num_generations": 4,
            "batch_size": 8,
            "lr": 5e-3,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "epsilon": 0.2,
            "epsilon_high": 0.28,
            "beta": 0.0,
            "loss_agg": "token-mean",
            "scale_rewards": "group",
            "max_new_tokens": 8,
            "temperature": 1.0,
            "top_p": 1.0,
            "steps": args.steps,
            "save_every": 2,
            "eval_every": 2,
            "seed": 0,
        },
        "verl": {
            "nnodes": 1,
            "n_gpus_per_node": 1,
            "rollout": "vllm",
            "rollout_tp": 1,
            "gpu_memory_utilization": 0.3,
            "max_prompt_length": 16,
            "micro_batch_size_per_gpu": 8,
            "save_contents": ["model", "optimizer", "extra", "hf_model"],
            "checkpoint_dtype": "float32",
            "project_name": "rlvrx-gpu-check",
            "logger": ["console", "file"],
            "overrides": [*GPU_OVERRIDES, *args.override],
        },
        "output": {"dir": str(Path(args.run).resolve())},
    }
    if args.rl_extra:
        m, n = args.rl_extra
        body["rl_extra"] = {"m": m, "n": n, "iterations": 1, "anchor": "cycle_start", "fit": "two_point", "optimizer_state": "keep", "norms": "copy"}
        body["grpo"]["save_every"] = m
    Path(args.out).write_text(json.dumps(body, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# jump


def jump(args) -> int:
    """The RL-Extra jump of the run, from its trajectory: J = A + ((m+n)/m)(B - A) for every jumped
    tensor (float64 reference), J = B for the kept ones (norms, copied)."""
    from rlvrx.backends.verl.jump import jump_factor, kept
    from rlvrx.io.reader import Checkpoint
    from rlvrx.trajectory import Trajectory

    traj = Trajectory.load(args.run)
    kinds = {e.step: e.kind for e in traj}
    a_step, b_step, j_step = 0, args.m, args.m + args.n
    if kinds.get(a_step) != "base" or kinds.get(b_step) != "rl" or kinds.get(j_step) != "extrapolated":
        print(f"trajectory {traj.manifest}: expected base@{a_step}, rl@{b_step}, extrapolated@{j_step}; has {kinds}")
        return 1
    factor = jump_factor(args.m, args.n)
    result = {"factor": factor, "jumped": 0, "kept": 0, "max_abs_err": 0.0, "max_move": 0.0, "kept_max_abs_err": 0.0}
    with Checkpoint(traj.path_of(a_step)) as a, Checkpoint(traj.path_of(b_step)) as b, Checkpoint(traj.path_of(j_step)) as j:
        for name in j.names():
            tb, tj = b.get(name).double(), j.get(name).double()
            if kept(name, j.info(name).dtype, "copy"):
                result["kept"] += 1
                result["kept_max_abs_err"] = max(result["kept_max_abs_err"], (tj - tb).abs().max().item())
                continue
            ta = a.get(name).double()
            expect = ta + factor * (tb - ta)
            result["jumped"] += 1
            result["max_abs_err"] = max(result["max_abs_err"], (tj - expect).abs().max().item())
            result["max_move"] = max(result["max_move"], (tb - ta).abs().max().item())
    # float32 storage: the jump is computed in float32, so allow a few ulps of the values involved
    result["ok"] = bool(
        result["jumped"]
        and result["max_move"] > 0
        and result["max_abs_err"] < 1e-5
        and result["kept_max_abs_err"] == 0.0
        and not math.isnan(result["max_abs_err"])
    )
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0 if result["ok"] else 1


# ----------------------------------------------------------------------------------------------
# summary (standard library only: it must print even when the install failed)


def _table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    body = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join([title, line, "-" * len(line), *body])


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            item = json.loads(line)
            rows.append({"step": item["step"], **item["data"]})
        except (ValueError, KeyError, TypeError):
            continue
    return rows


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else ("-" if value is None else str(value))


STEP_KEYS = (
    "timing_s/step",
    "timing_s/gen",
    "timing_s/update_actor",
    "timing_s/update_weights",
    "timing_s/save_checkpoint",
    "critic/score/mean",
    "rlvrx/jump_max_abs_change",
)


def summary(args) -> int:
    work = Path(args.work)
    stages = []
    status_file = work / "stages.tsv"
    if status_file.is_file():
        stages = [line.split("\t") for line in status_file.read_text().splitlines() if line.strip()]
    out = [_table("GPU check stages", ["stage", "status", "seconds", "log"], [s[:4] for s in stages])]
    report = {"stages": {s[0]: {"status": s[1], "seconds": s[2], "log": s[3]} for s in stages}}

    for name in ("train", "rl-extra"):
        rows = [r for r in _metrics(work / f"{name}-metrics.jsonl") if any(k in r for k in STEP_KEYS)]
        if rows:
            keys = [k for k in STEP_KEYS if any(k in r for r in rows)]
            out.append(_table(f"\n{name}: verl steps", ["step", *keys], [[r["step"], *(_fmt(r.get(k)) for k in keys)] for r in rows]))
            report[f"{name}_steps"] = rows

    eval_file = work / "eval.json"
    if eval_file.is_file():
        results = json.loads(eval_file.read_text())
        rows = []
        for model, tasks in results.items():
            for task, numbers in tasks.items():
                if isinstance(numbers, dict):
                    rows.append(
                        [
                            model,
                            task,
                            _fmt(numbers.get("problems")),
                            _fmt(numbers.get("n")),
                            _fmt(numbers.get("avg")),
                            _fmt(numbers.get("pass@1")),
                            _fmt(numbers.get("pass@4")),
                        ]
                    )
        out.append(_table("\neval (vllm engine)", ["model", "task", "problems", "n", "avg", "pass@1", "pass@4"], rows))
        report["eval"] = results

    jump_file = work / "jump.json"
    if jump_file.is_file():
        j = json.loads(jump_file.read_text())
        out.append(_table("\nRL-Extra jump check: J = A + factor (B - A), norms J = B", ["check", "value"], [[k, _fmt(v)] for k, v in j.items()]))
        report["jump"] = j

    failed = [s[0] for s in stages if s[1] not in ("ok", "dry-run")]
    out.append(f"\n{'ALL STAGES OK' if not failed else 'FAILED: ' + ', '.join(failed)}  (work dir: {work})")
    print("\n".join(out))
    (work / "summary.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("recipe")
    p.add_argument("out")
    p.add_argument("--model", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rl-extra", type=int, nargs=2, metavar=("M", "N"))
    p.add_argument("--override", action="append", default=[], help="an extra verl Hydra override (repeat)")
    p = sub.add_parser("jump")
    p.add_argument("run")
    p.add_argument("--m", type=int, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--json", required=True)
    p = sub.add_parser("summary")
    p.add_argument("work")
    args = parser.parse_args(argv)
    if args.command == "recipe":
        recipe(args)
        return 0
    return jump(args) if args.command == "jump" else summary(args)


if __name__ == "__main__":
    sys.exit(main())
