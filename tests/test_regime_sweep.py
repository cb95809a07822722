"""scripts/regime_sweep.py: its aggregation over seeds, the RL-Extra speed-up, the recipes it generates,
and recipes/reproduce.yaml (fake per-run JSONs with hand-computed medians and spreads; no training)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from clirun import run_cli
from rlvrx.cli.pipeline import check_stages
from rlvrx.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("regime_sweep", ROOT / "scripts" / "regime_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def fake(
    config: str,
    seed: int,
    w: float,
    frac: float,
    lp: float | None,
    tokens: int | None,
    real: float,
    wx: float,
    second: float,
    lx: float,
    speed: float | None = None,
    bound: bool = False,
    wall: float = 10.0,
    cpu: float = 20.0,
) -> dict:
    result = {
        "config": config,
        "seed": seed,
        "settings": {**sweep.BASE},
        "weight_r2_median": w,
        "weight_frac_gt_0_7": frac,
        "logprob_r2_median": lp,
        "logprob_tokens": tokens,
        "spacing": {"10": {"weight_r2_median": w + 0.05, "weight_frac_gt_0_7": frac}, "20": {"weight_r2_median": 0.0, "weight_frac_gt_0_7": 0.0}},
        "eval": {"base@100": 0.1, "second@150": second, "real@200": real, "weights-extrapolated@200": wx, "logits-extrapolated@200": lx},
        "times": {"run": {"wall_s": wall, "cpu_s": cpu}, "spacing2": {"wall_s": 1.0, "cpu_s": 2.0}},
    }
    if speed is not None:
        result["rl_extra"] = {"speedup": speed, "lower_bound": bound}
    return result


def test_spread_is_median_and_range_over_seeds_ignoring_missing():
    assert sweep.spread([0.8, 0.9, 0.6]) == {"median": 0.8, "min": 0.6, "max": 0.9, "n": 3}
    assert sweep.spread([0.2, None, 0.4, 0.1]) == {"median": 0.2, "min": 0.1, "max": 0.4, "n": 3}
    assert sweep.spread([1.0, 3.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 2}  # even count: mean of the middle two
    assert sweep.spread([None, None]) is None


def test_aggregate_by_configuration_with_hand_computed_cells():
    results = [
        fake("b", 0, 0.5, 0.3, 0.2, 100, real=0.50, wx=0.40, second=0.45, lx=0.55),
        fake("a", 2, 0.6, 0.50, None, None, real=0.60, wx=0.70, second=0.50, lx=0.60, speed=1.5, bound=True, wall=30, cpu=40),
        fake("a", 0, 0.8, 0.70, 0.4, 300, real=0.70, wx=0.65, second=0.60, lx=0.75, speed=0.5),
        fake("a", 1, 0.9, 0.90, 0.3, 200, real=0.80, wx=0.80, second=0.70, lx=0.80, speed=1.0),
    ]
    rows = {row["config"]: row for row in sweep.aggregate(results)}
    assert [row["config"] for row in sweep.aggregate(results)] == ["b", "a"]
    a = rows["a"]
    assert a["seeds"] == [0, 1, 2]
    assert a["weight R2 med"] == {"median": 0.8, "min": 0.6, "max": 0.9, "n": 3}
    assert a["frac>0.7"] == {"median": 0.7, "min": 0.5, "max": 0.9, "n": 3}
    assert a["weight R2 med x2 spacing"]["median"] == pytest.approx(0.85)  # the finer of the two extra spacings
    assert a["weight R2 med x4 spacing"] == {"median": 0.0, "min": 0.0, "max": 0.0, "n": 3}
    assert a["logprob R2 med"] == {"median": pytest.approx(0.35), "min": 0.3, "max": 0.4, "n": 2}
    assert a["tokens"]["median"] == 250
    # weights-extrapolated minus real, seeds 0, 1, 2: 0.65-0.70, 0.80-0.80, 0.70-0.60
    assert a["W-extra - real"]["median"] == pytest.approx(0.0)
    assert a["W-extra - real"]["min"] == pytest.approx(-0.05)
    assert a["W-extra - real"]["max"] == pytest.approx(0.10)
    # logits-extrapolated minus second: 0.75-0.60, 0.80-0.70, 0.60-0.50
    assert a["L-extra - second"]["median"] == pytest.approx(0.10)
    assert a["L-extra - second"]["max"] == pytest.approx(0.15)
    assert a["RL-Extra speed-up"] == {"median": 1.0, "min": 0.5, "max": 1.5, "n": 3}
    assert a["speed-up lower bounds"] == 1
    assert a["wall s"] == {"median": 11.0, "min": 11.0, "max": 31.0, "n": 3}  # per run: run + spacing commands
    assert a["cpu s"]["max"] == 42.0
    assert rows["b"]["RL-Extra speed-up"] is None


def test_markdown_and_table_command_from_result_files(tmp_path):
    for r in (
        fake("a", 0, 0.8, 0.7, 0.4, 300, 0.7, 0.65, 0.6, 0.75),
        fake("a", 1, 0.9, 0.9, 0.3, 200, 0.8, 0.8, 0.7, 0.8),
        fake("a", 2, 0.6, 0.5, 0.2, 100, 0.6, 0.7, 0.5, 0.6, speed=2.0, bound=True),
    ):
        run = tmp_path / "runs" / f"a-s{r['seed']}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps(r))
    md = tmp_path / "table.md"
    assert sweep.main(["table", "--out", str(tmp_path), "--md", str(md)]) == 0
    lines = md.read_text().splitlines()
    assert len(lines) == 3  # header, rule, one configuration
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    row = dict(zip(head, cells))
    assert row["seeds"] == "0,1,2"
    assert row["weight R2 med"] == "0.80 [0.60, 0.90]"
    assert row["tokens"] == "200 [100, 300]"
    assert row["RL-Extra speed-up"] == "2.00 (1 lower bound)"
    assert row["settings"] == "h64 2d add SFT 200 (lr 0.003) GRPO lr 5e-05 200 steps /5"
    assert sweep.main(["table", "--out", str(tmp_path), "--md", str(md), "--per-run"]) == 0
    runs = md.read_text().splitlines()[2:]
    assert runs[2] == "| a-s2 | 0.60 | 0.50 | 0.20 (100) | 2.00 (lower bound) | - | run 10/20, spacing2 1/2 |"


def test_speedup_against_the_plain_curve():
    plain = [{"grad_step": 0, "accuracy": 0.1}, {"grad_step": 10, "accuracy": 0.3}, {"grad_step": 20, "accuracy": 0.5}, {"grad_step": 30, "accuracy": 0.6}]
    reached = sweep.speedup(plain, [{"grad_step": 0, "accuracy": 0.1}, {"grad_step": 10, "accuracy": 0.5}])
    assert reached["plain_grad_steps"] == 20 and reached["speedup"] == 2.0 and not reached["lower_bound"]
    assert reached["plain_accuracy_at_same_steps"] == 0.3
    never = sweep.speedup(plain, [{"grad_step": 15, "accuracy": 0.9}])
    assert never["plain_grad_steps"] == 30 and never["speedup"] == 2.0 and never["lower_bound"]


def test_answer_length_and_generated_recipes_validate(tmp_path):
    assert sweep.max_new_tokens({"digits": 2, "ops": "+"}) == 4  # 99+99=198, then the stop token
    assert sweep.max_new_tokens({"digits": 3, "ops": "+"}) == 5  # 1998
    assert sweep.max_new_tokens({"digits": 2, "ops": "*"}) == 5  # 9801
    for name in sweep.CONFIGS:
        cfg = sweep.config(name)
        for i, data in enumerate(
            (
                sweep.sft_recipe(cfg, tmp_path / "sft"),
                sweep.run_recipe(cfg, 1, tmp_path / "sft", tmp_path / "run"),
                sweep.rl_extra_recipe(cfg, 1, tmp_path / "sft", tmp_path / "rx"),
            )
        ):
            path = tmp_path / f"{name}-{i}.yaml"
            path.write_text(yaml.safe_dump(data))
            recipe = load_recipe(path)
            assert check_stages(recipe) == []
            assert recipe.grpo.lr == cfg["lr"]
            assert recipe.sft.lr == cfg["sft_lr"]
    run = load_recipe(tmp_path / "base-1.yaml")
    assert run.grpo.seed == 1 and run.sft.enabled is False and run.model.path.endswith("step_000000")
    window = {s.kind: s.options for s in run.stages}["extrapolate-weights"]
    assert window == {"base": 100, "second": 150, "target": 200}


def test_reproduce_recipe_validates():
    code, out, err = run_cli("recipe", "validate", str(ROOT / "recipes" / "reproduce.yaml"))
    assert code == 0, err
    assert "ok" in out


def test_sft_key_names_a_non_default_sft_lr_and_the_sft_table_reads_the_warm_ups(tmp_path):
    assert sweep.sft_key(sweep.config("base")) == "h64-d2-add-sft200"  # the default SFT lr keeps the old name
    assert sweep.sft_key(sweep.config("h128-sft400-lr1e-3")) == "h128-d2-add-sft400-lr0.001"
    sft = tmp_path / "sft" / "h64-d2-add-sft200"
    sft.mkdir(parents=True)
    (sft / "sft-times.json").write_text(json.dumps({"wall_s": 22.4, "cpu_s": 8.6}))
    records = [{"stage": "sft", "sft_step": 200, "loss": 0.5}, {"stage": "grpo", "step": 0, "grad_step": 0, "test_accuracy": 0.225}]
    (sft / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert sweep.sft_markdown(tmp_path).splitlines()[2] == "| h64-d2-add-sft200 | 0.225 | 22 | 9 |"
