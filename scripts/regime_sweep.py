"""Regime sweep (issue #21): where do the paper's linear-dynamics effects show at toy scale?

Each configuration is the quickstart pipeline (recipes/quickstart.yaml) with some knobs changed:
GRPO learning rate, model width, task (digits, operator), number of steps. The SFT warm-up depends
only on (width, task): it runs once per pair (`rlvrx train` with grpo.steps=0, model init seed 0)
and every GRPO run of that pair starts from its step-0 checkpoint; seeds vary the GRPO seed (rollout
sampling, batch order). Per run (config x seed) the driver runs `rlvrx run` on a generated recipe,
then weight linearity again on every 2nd and 4th checkpoint (checkpoint spacing), then optionally
RL-Extra (m = n = 20) on the same start, and writes RUN/result.json:

  weight R^2 median and fraction > 0.7 (at spacing save_every, x2, x4); token log-prob R^2 median and
  the number of tokens it is over; eval accuracy (avg@k) of base / second / real target / weight- and
  logits-extrapolated targets (window steps/2, 3 steps/4 -> steps); RL-Extra's speed-up: gradient steps
  plain GRPO (this run's greedy-accuracy curve) needs to reach RL-Extra's final accuracy, over
  RL-Extra's gradient steps (a lower bound, marked '>', when plain GRPO never reaches it);
  wall and CPU seconds of every command (CPU: the children's user + system time).

Finished runs are skipped (resumable: `rlvrx run` skips finished stages too). `table` aggregates:
per configuration the median over seeds and the [min, max] spread.

    nice -n 19 python scripts/regime_sweep.py run --out sweep --configs base,lr1e-4 --seeds 0,1,2
    python scripts/regime_sweep.py table --out sweep --md sweep/table.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

BASE = {"hidden": 64, "digits": 2, "ops": "+", "lr": 5e-5, "steps": 200, "save_every": 5, "sft_steps": 200, "sft_lr": 3e-3}
CONFIGS: dict[str, dict] = {
    "base": {},
    "lr1e-5": {"lr": 1e-5},
    "lr2e-5": {"lr": 2e-5},
    "lr1e-4": {"lr": 1e-4},
    "h128": {"hidden": 128},
    "h256": {"hidden": 256},
    "d3": {"digits": 3, "sft_steps": 800},
    "mul": {"ops": "*", "sft_steps": 800},
    "lr1e-4-h128": {"lr": 1e-4, "hidden": 128},
    "lr1e-4-400": {"lr": 1e-4, "steps": 400, "save_every": 10},
    "sft500": {"sft_steps": 500},
    "lr2e-5-sft500": {"lr": 2e-5, "sft_steps": 500},
    "h128-sft800": {"hidden": 128, "sft_steps": 800},
    "h256-sft800": {"hidden": 256, "sft_steps": 800},
    "lr1e-5-sft500": {"lr": 1e-5, "sft_steps": 500},
    "d3-sft4000": {"digits": 3, "sft_steps": 4000},
    "mul-sft4000": {"ops": "*", "sft_steps": 4000},
    "h128-sft400-lr1e-3": {"hidden": 128, "sft_steps": 400, "sft_lr": 1e-3},
    "h256-sft400-lr1e-3": {"hidden": 256, "sft_steps": 400, "sft_lr": 1e-3},
}
OP_NAMES = {"+": "add", "-": "sub", "*": "mul"}
SPACINGS = (2, 4)  # extra weight-linearity passes on every 2nd / 4th checkpoint


def config(name: str) -> dict:
    if name not in CONFIGS:
        raise SystemExit(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
    return {**BASE, **CONFIGS[name]}


def max_new_tokens(cfg: dict) -> int:
    """Digits of the largest answer plus the stop token."""
    top = 10 ** cfg["digits"] - 1
    largest = max(top * top if op == "*" else top + top for op in cfg["ops"])
    return len(str(largest)) + 1


def sft_key(cfg: dict) -> str:
    key = f"h{cfg['hidden']}-d{cfg['digits']}-{''.join(OP_NAMES[o] for o in cfg['ops'])}-sft{cfg['sft_steps']}"
    return key if cfg.get("sft_lr", 3e-3) == 3e-3 else f"{key}-lr{cfg['sft_lr']:g}"


def _base_recipe(cfg: dict) -> dict:
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["model"]["tiny"].update(hidden=cfg["hidden"], intermediate=4 * cfg["hidden"])
    recipe["task"].update(digits=cfg["digits"], operators=list(cfg["ops"]))
    recipe["sft"].update(steps=cfg["sft_steps"], lr=cfg.get("sft_lr", 3e-3))
    recipe["grpo"].update(lr=cfg["lr"], steps=cfg["steps"], save_every=cfg["save_every"], eval_every=10, max_new_tokens=max_new_tokens(cfg))
    return recipe


def sft_recipe(cfg: dict, out: Path) -> dict:
    recipe = _base_recipe(cfg)
    recipe["grpo"]["steps"] = 0
    recipe["output"] = {"dir": str(out)}
    recipe["stages"] = [{"kind": "train"}]
    return recipe


def run_recipe(cfg: dict, seed: int, sft_dir: Path, out: Path) -> dict:
    recipe = _base_recipe(cfg)
    recipe["model"] = {"path": str(sft_dir / "checkpoints" / "step_000000")}
    recipe["sft"]["enabled"] = False
    recipe["grpo"]["seed"] = seed
    recipe["output"] = {"dir": str(out)}
    steps, tokens = cfg["steps"], max_new_tokens(cfg)
    base, second = steps // 2, 3 * steps // 4
    window = {"base": base, "second": second, "target": steps}
    for stage in recipe["stages"]:
        kind = stage["kind"]
        if kind == "linearity-logprobs":
            stage["options"].update(generate=256, max_new_tokens=tokens)
        elif kind == "extrapolate-weights":
            stage["options"] = dict(window)
        elif kind == "extrapolate-logits":
            stage["options"].update(window)
        elif kind == "eval":
            stage["args"] = [f"{{run}}:{base}", f"{{run}}:{second}", f"{{run}}:{steps}", f"{{run}}/extrapolated/step_{steps:06d}"]
            stage["options"]["generations"] = f"{{run}}/extrapolated/logits-s{base}-s{second}-t{steps}/arithmetic.jsonl"
            stage["options"]["name"] = [f"base@{base}", f"second@{second}", f"real@{steps}", f"weights-extrapolated@{steps}", f"logits-extrapolated@{steps}"]
    return recipe


def rl_extra_recipe(cfg: dict, seed: int, sft_dir: Path, out: Path, n: int = 20) -> dict:
    recipe = run_recipe(cfg, seed, sft_dir, out)
    recipe.pop("stages")
    recipe["rl_extra"] = {"m": 20, "n": n, "iterations": cfg["steps"] // 40}
    return recipe


# ----------------------------------------------------------------------------------------------
# Running


def timed(argv: list[str], log: Path) -> dict:
    """Run argv (stdout/stderr appended to log); wall and children's CPU seconds; raises on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(argv) + "\n")
        fh.flush()
        code = subprocess.call(argv, stdout=fh, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - start
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if code != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed with exit code {code}; see {log}")
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _rlvrx() -> list[str]:
    return [sys.executable, "-m", "rlvrx"]


def ensure_sft(cfg: dict, out: Path) -> tuple[Path, dict | None]:
    sft_dir = out / "sft" / sft_key(cfg)
    done = sft_dir / "sft-times.json"
    if done.is_file():
        return sft_dir, None
    recipe = _write_yaml(out / "recipes" / f"sft-{sft_key(cfg)}.yaml", sft_recipe(cfg, sft_dir))
    times = timed(_rlvrx() + ["train", str(recipe), "--no-progress"], out / "logs" / f"sft-{sft_key(cfg)}.log")
    done.write_text(json.dumps(times) + "\n")
    return sft_dir, times


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def spacing_args(run_dir: Path, every: int) -> list[str]:
    trajectory = _read(run_dir / "trajectory.json")
    entries = trajectory["checkpoints"] if isinstance(trajectory, dict) else trajectory
    steps = sorted(int(c["step"]) for c in entries if c.get("kind", "rl") == "rl")
    keep = [s for i, s in enumerate(steps) if i % every == 0]
    return [arg for s in keep for arg in ("-c", f"{s}={run_dir / 'checkpoints' / f'step_{s:06d}'}")]


def run_one(name: str, seed: int, out: Path, rl_extra: bool, n: int = 20) -> dict:
    """One configuration and seed; RL-Extra with a jump n other than 20 goes to its own key (rl_extra_nN)."""
    key = "rl_extra" if n == 20 else f"rl_extra_n{n}"
    cfg = config(name)
    run_dir = out / "runs" / f"{name}-s{seed}"
    result_path = run_dir / "result.json"
    previous = _read(result_path) if result_path.is_file() else {}
    if previous and (previous.get(key) or not rl_extra):
        return previous
    sft_dir, sft_times = ensure_sft(cfg, out)
    log = out / "logs" / f"{name}-s{seed}.log"
    times = {}
    recipe = _write_yaml(out / "recipes" / f"{name}-s{seed}.yaml", run_recipe(cfg, seed, sft_dir, run_dir))
    times["run"] = timed(_rlvrx() + ["run", str(recipe)], log)
    spacing = {}
    for every in SPACINGS:
        js = run_dir / f"linearity-weights-every{every}.json"
        if not js.is_file():
            times[f"spacing{every}"] = timed(
                _rlvrx()
                + ["linearity", "weights", *spacing_args(run_dir, every), "--out", str(run_dir / f"linearity-every{every}"), "--json", str(js), "--no-plots"],
                log,
            )
        spacing[every * cfg["save_every"]] = _read(js)
    result = {**previous, "config": name, "seed": seed, "settings": cfg, "sft_key": sft_key(cfg), "sft_times": previous.get("sft_times") or sft_times}
    result.update(collect(run_dir, spacing))
    if rl_extra:
        suffix = "rlextra" if n == 20 else f"rlextra-n{n}"
        rx_dir = out / "runs" / f"{name}-s{seed}-{suffix}"
        rx_recipe = _write_yaml(out / "recipes" / f"{name}-s{seed}-{suffix}.yaml", rl_extra_recipe(cfg, seed, sft_dir, rx_dir, n))
        times[key] = timed(_rlvrx() + ["rl-extra", str(rx_recipe), "--no-progress", "--json", str(rx_dir / "summary.json")], log)
        result[key] = speedup(curve(run_dir), curve(rx_dir))
    result["times"] = {**times, **previous.get("times", {})}  # a rerun skips finished work: keep the first measurement
    result_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


# ----------------------------------------------------------------------------------------------
# Collecting one run


def curve(run_dir: Path) -> list[dict]:
    points = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "test_accuracy" in record and record.get("stage") == "grpo":
            points.append({"grad_step": record.get("grad_step", record.get("step")), "accuracy": record["test_accuracy"]})
    return points


def speedup(plain: list[dict], extra: list[dict]) -> dict:
    """Gradient steps plain GRPO needs to reach RL-Extra's final accuracy, over RL-Extra's gradient steps."""
    goal, extra_steps = extra[-1]["accuracy"], extra[-1]["grad_step"]
    reached = [p["grad_step"] for p in plain if p["accuracy"] >= goal]
    plain_steps = reached[0] if reached else plain[-1]["grad_step"]
    return {
        "accuracy": goal,
        "grad_steps": extra_steps,
        "plain_grad_steps": plain_steps,
        "speedup": plain_steps / extra_steps if extra_steps else None,
        "lower_bound": not reached,
        "plain_accuracy_at_same_steps": max((p["accuracy"] for p in plain if p["grad_step"] <= extra_steps), default=None),
    }


def collect(run_dir: Path, spacing: dict) -> dict:
    stages = run_dir / "stages"
    weights = _read(stages / "linearity-weights.json")
    logprobs = _read(stages / "linearity-logprobs.json")
    ev = _read(stages / "eval.json")
    metrics = {
        "weight_r2_median": weights["median_r2"],
        "weight_frac_gt_0_7": weights["frac_r2_gt_0_7"],
        "logprob_r2_median": logprobs["median_r2"],
        "logprob_tokens": logprobs["n_tokens"],
        "spacing": {str(k): {"weight_r2_median": v["median_r2"], "weight_frac_gt_0_7": v["frac_r2_gt_0_7"]} for k, v in spacing.items()},
        "eval": {m["name"]: m["avg"] for m in eval_models(ev)},
        "eval_stderr": {m["name"]: m["avg_stderr"] for m in eval_models(ev)},
    }
    acc = curve(run_dir)
    metrics["greedy_start"], metrics["greedy_end"] = acc[0]["accuracy"], acc[-1]["accuracy"]
    return metrics


def eval_models(summary: dict) -> list[dict]:
    """[{name, avg, avg_stderr}] from the eval stage's JSON summary ({model: {task: {avg, avg_stderr, ...}}})."""
    rows = []
    for name, tasks in summary.items():
        cell = next(iter(tasks.values()))
        rows.append({"name": name, "avg": cell.get("avg"), "avg_stderr": cell.get("avg_stderr")})
    return rows


# ----------------------------------------------------------------------------------------------
# Aggregation


def spread(values: list) -> dict | None:
    """Median and [min, max] over seeds (None values left out); None when nothing is left."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _get(result: dict, path: str):
    node = result
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _eval_avg(result: dict, prefix: str):
    """avg of the run's `prefix@...` model (None when it has none)."""
    return next((v for k, v in (result.get("eval") or {}).items() if k.startswith(prefix + "@")), None)


def _eval_gap(result: dict, prefix: str, reference: str):
    """avg of the `prefix@...` model minus the `reference@...` one."""
    a, b = _eval_avg(result, prefix), _eval_avg(result, reference)
    return None if a is None or b is None else a - b


def _spaced(result: dict, index: int):
    """Weight R² median of the index-th extra spacing pass (0: every 2nd checkpoint, 1: every 4th)."""
    passes = sorted((result.get("spacing") or {}).items(), key=lambda kv: int(kv[0]))
    return passes[index][1].get("weight_r2_median") if index < len(passes) else None


COLUMNS = (
    ("weight R2 med", lambda r: r.get("weight_r2_median")),
    ("frac>0.7", lambda r: r.get("weight_frac_gt_0_7")),
    ("weight R2 med x2 spacing", lambda r: _spaced(r, 0)),
    ("weight R2 med x4 spacing", lambda r: _spaced(r, 1)),
    ("logprob R2 med", lambda r: r.get("logprob_r2_median")),
    ("tokens", lambda r: r.get("logprob_tokens")),
    ("greedy start", lambda r: r.get("greedy_start")),
    ("greedy end", lambda r: r.get("greedy_end")),
    ("real", lambda r: _eval_avg(r, "real")),
    ("W-extra - real", lambda r: _eval_gap(r, "weights-extrapolated", "real")),
    ("W-extra - second", lambda r: _eval_gap(r, "weights-extrapolated", "second")),
    ("L-extra - real", lambda r: _eval_gap(r, "logits-extrapolated", "real")),
    ("L-extra - second", lambda r: _eval_gap(r, "logits-extrapolated", "second")),
    ("RL-Extra speed-up", lambda r: _get(r, "rl_extra.speedup")),
    ("wall s", lambda r: sum(t["wall_s"] for t in (r.get("times") or {}).values())),
    ("cpu s", lambda r: sum(t["cpu_s"] for t in (r.get("times") or {}).values())),
)


def aggregate(results: list[dict]) -> list[dict]:
    """One row per configuration (first-seen order): seeds and each column's spread over them."""
    by_config: dict[str, list[dict]] = {}
    for r in results:
        by_config.setdefault(r["config"], []).append(r)
    rows = []
    for name, runs in by_config.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        row = {"config": name, "settings": runs[0].get("settings"), "seeds": [r["seed"] for r in runs]}
        for label, get in COLUMNS:
            row[label] = spread([get(r) for r in runs])
        bounds = [r for r in runs if _get(r, "rl_extra.lower_bound")]
        row["speed-up lower bounds"] = len(bounds)
        rows.append(row)
    return rows


def fmt(cell: dict | None, digits: int = 2) -> str:
    if cell is None:
        return "-"
    if cell["n"] == 1:
        return f"{cell['median']:.{digits}f}"
    return f"{cell['median']:.{digits}f} [{cell['min']:.{digits}f}, {cell['max']:.{digits}f}]"


def markdown(rows: list[dict]) -> str:
    head = ["config", "settings", "seeds"] + [label for label, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        s = row["settings"] or {}
        settings = (
            f"h{s.get('hidden')} {s.get('digits')}d {OP_NAMES.get(s.get('ops'), s.get('ops'))} SFT {s.get('sft_steps')} (lr {s.get('sft_lr', 3e-3):g}) "
            f"GRPO lr {s.get('lr'):g} {s.get('steps')} steps /{s.get('save_every')}"
            if s
            else ""
        )
        cells = [row["config"], settings, ",".join(map(str, row["seeds"]))]
        for label, _ in COLUMNS:
            digits = 0 if label in ("tokens", "wall s", "cpu s") else 2
            text = fmt(row[label], digits)
            if label == "RL-Extra speed-up" and row["speed-up lower bounds"]:
                text += f" ({row['speed-up lower bounds']} lower bound)"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_run_markdown(results: list[dict]) -> str:
    """One row per run: its own numbers and every command's wall / CPU seconds."""
    lines = [
        "| run | weight R2 med | frac>0.7 | logprob R2 med (tokens) | RL-Extra speed-up n=20 | n=10 | commands: wall s / cpu s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["config"], r["seed"])):

        def num(value, digits=2):
            return "-" if value is None else f"{value:.{digits}f}"

        def speed(key, r=r):
            x = r.get(key)
            return "-" if not x else num(x["speedup"]) + (" (lower bound)" if x["lower_bound"] else "")

        times = ", ".join(f"{k} {t['wall_s']:.0f}/{t['cpu_s']:.0f}" for k, t in (r.get("times") or {}).items())
        lines.append(
            f"| {r['config']}-s{r['seed']} | {num(r.get('weight_r2_median'))} | {num(r.get('weight_frac_gt_0_7'))} | "
            f"{num(r.get('logprob_r2_median'))} ({r.get('logprob_tokens')}) | {speed('rl_extra')} | {speed('rl_extra_n10')} | {times} |"
        )
    return "\n".join(lines) + "\n"


def sft_markdown(out: Path) -> str:
    """One row per shared SFT warm-up: its greedy test accuracy (GRPO's starting point) and its time."""
    lines = ["| SFT warm-up | greedy test accuracy after SFT | wall s | cpu s |", "|---|---|---|---|"]
    for times_path in sorted((out / "sft").glob("*/sft-times.json")):
        times = _read(times_path)
        start = next((r["accuracy"] for r in curve(times_path.parent) if r["grad_step"] == 0), None)
        acc = "-" if start is None else f"{start:.3f}"
        lines.append(f"| {times_path.parent.name} | {acc} | {times['wall_s']:.0f} | {times['cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


def load_results(out: Path) -> list[dict]:
    return [_read(p) for p in sorted((out / "runs").glob("*/result.json"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run configurations x seeds (finished ones are skipped)")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--configs", required=True, help=f"comma-separated, from: {', '.join(CONFIGS)}")
    run.add_argument("--seeds", default="0")
    run.add_argument("--rl-extra", action="store_true", help="also run RL-Extra from the same start and measure its speed-up")
    run.add_argument("--rl-extra-n", type=int, default=20, help="RL-Extra's jump n (m = 20); results other than 20 go to rl_extra_nN")
    table = sub.add_parser("table", help="aggregate the finished runs into a markdown table")
    table.add_argument("--out", type=Path, required=True)
    table.add_argument("--md", type=Path)
    table.add_argument("--per-run", action="store_true", help="one row per run instead of one per configuration")
    table.add_argument("--sft", action="store_true", help="one row per shared SFT warm-up instead")
    args = parser.parse_args(argv)
    if args.command == "run":
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # two sweeps side by side on 2 cores
        for name in args.configs.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                config(name)
                t = time.strftime("%H:%M:%S")
                print(f"[{t}] {name} seed {seed}", flush=True)
                result = run_one(name, seed, args.out, args.rl_extra, args.rl_extra_n)
                print(json.dumps({k: result.get(k) for k in ("weight_r2_median", "logprob_r2_median", "eval", "rl_extra", "times")}), flush=True)
        return 0
    results = load_results(args.out)
    text = sft_markdown(args.out) if args.sft else per_run_markdown(results) if args.per_run else markdown(aggregate(results))
    if args.md:
        args.md.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
