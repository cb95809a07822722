"""Log-prob linearity on tiny checkpoints, against direct forward passes and numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli

from rlvrx.errors import UsageError
from rlvrx.linearity.logprobs import (
    PUBLIC_KEYS,
    Probe,
    analyze_logprobs,
    check_probes,
    load_probes,
    score_checkpoints,
    tokenize_probes,
)
from rlvrx.tiny import build_tiny_model

STEPS = [0, 20, 40, 70]
PROBES = [
    {"prompt": "<bos>12+34=", "response": "46<eos>"},
    {"prompt": "<bos>7+8=", "responses": ["15<eos>", "1 5", "fifteen"]},
    {"prompt": "<bos>99+1=", "response": "100"},
]


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    """Four tiny checkpoints W(step) = W0 + step * D + small noise: log-probs move smoothly with step."""
    root = tmp_path_factory.mktemp("traj")
    model, tokenizer = build_tiny_model(layers=1, hidden=32, heads=4, kv_heads=2, intermediate=64, max_position=32, seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(v.shape, generator=gen) * 0.004 for k, v in base.items()}
    entries = []
    for i, step in enumerate(STEPS):
        noise = {k: torch.randn(v.shape, generator=gen) * 0.002 for k, v in base.items()}
        model.load_state_dict({k: base[k] + step * direction[k] + noise[k] for k in base})
        path = root / "checkpoints" / f"step_{step:06d}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        entries.append({"step": step, "path": str(path.relative_to(root)), "kind": "base" if i == 0 else "rl"})
    (root / "trajectory.json").write_text(json.dumps(entries))
    probes = root / "probes.jsonl"
    probes.write_text("".join(json.dumps(p) + "\n" for p in PROBES))
    return root, tokenizer


def direct_logprobs(path: Path, prompt_ids, response_ids):
    """Reference: one unpadded forward pass of prompt + response, float64 log-softmax."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    n = len(response_ids)
    rows = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + n]
    targets = torch.tensor(response_ids)
    chosen = rows.gather(-1, targets[:, None])[:, 0]
    return (chosen - torch.logsumexp(rows, -1)).numpy(), chosen.numpy()


def numpy_r2(values: np.ndarray, steps) -> np.ndarray:
    return np.array([np.corrcoef(np.asarray(steps, float), values[:, j])[0, 1] ** 2 for j in range(values.shape[1])])


def test_load_probes_both_forms_and_errors(tmp_path, trajectory):
    _, tokenizer = trajectory
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBES) + "\n")
    probes = load_probes(path)
    assert [p.source for p in probes] == ["p.jsonl:1", "p.jsonl:2#0", "p.jsonl:2#1", "p.jsonl:2#2", "p.jsonl:3"]
    assert [p.response for p in probes] == ["46<eos>", "15<eos>", "1 5", "fifteen", "100"]
    tokenize_probes(probes, tokenizer)
    assert probes[0].prompt_ids[0] == tokenizer.bos_token_id and len(probes[0].prompt_ids) == 7
    assert probes[0].response_ids == [7, 9, tokenizer.eos_token_id]  # '4' '6' (after 3 specials) <eos>: one token per character
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    with pytest.raises(UsageError, match="bad.jsonl:2: invalid JSON at line 1"):
        load_probes(bad)
    bad.write_text('{"prompt": "a", "answer": "b"}\n')
    with pytest.raises(UsageError, match='bad.jsonl:1: needs "response"'):
        load_probes(bad)
    long = [Probe("p.jsonl:9", prompt_ids=[1] * 20, response_ids=[2] * 13)]
    with pytest.raises(UsageError, match="probe p.jsonl:9: prompt \\+ response is 33 tokens, longer than the model context of 32"):
        check_probes(long, 32)


def test_scores_match_direct_forward_pass(trajectory):
    root, tokenizer = trajectory
    probes = load_probes(root / "probes.jsonl")
    tokenize_probes(probes, tokenizer)
    paths = [(s, root / "checkpoints" / f"step_{s:06d}") for s in STEPS]
    calls = []
    logprobs, logits = score_checkpoints(paths, probes, batch_size=2, progress=lambda step, n: calls.append((step, n)))
    total = sum(len(p.response_ids) for p in probes)
    assert logprobs.shape == logits.shape == (len(STEPS), total)
    assert calls[:3] == [(0, 2), (0, 2), (0, 1)] and sum(n for _, n in calls) == len(STEPS) * len(probes)
    reference = np.zeros_like(logprobs)
    for k, (_, path) in enumerate(paths):
        ref_lp, ref_lg = [], []
        for p in probes:
            lp, lg = direct_logprobs(path, p.prompt_ids, p.response_ids)
            ref_lp.append(lp)
            ref_lg.append(lg)
        reference[k] = np.concatenate(ref_lp)
        np.testing.assert_allclose(logprobs[k], reference[k], rtol=0, atol=2e-5)
        np.testing.assert_allclose(logits[k], np.concatenate(ref_lg), rtol=0, atol=2e-5)
    # The perturbation really moves the log-probs, along a mostly linear path.
    assert np.abs(logprobs[-1] - logprobs[0]).max() > 0.2
    summary = analyze_logprobs(STEPS, probes, logprobs, logits, min_logprob_change=0.05)
    kept = [i for i, row in enumerate(summary["token_rows"]) if not row["filtered"]]
    assert len(kept) >= 5 and summary["n_tokens"] == len(kept)
    np.testing.assert_allclose([summary["token_rows"][i]["r2"] for i in kept], numpy_r2(reference[:, kept], STEPS), atol=1e-3)
    assert summary["median_r2"] > 0.5


def test_analyze_matches_numpy_and_counts_filters():
    steps = [0, 10, 20, 30, 50]
    rng = np.random.default_rng(0)
    k = len(steps)
    t = np.asarray(steps, float)
    moving = -2.0 + np.outer(t, rng.uniform(0.01, 0.03, size=6)) + rng.normal(size=(k, 6)) * 0.1  # changes > 0.2
    constant = np.full((k, 2), -1.5)
    small = -3.0 + rng.uniform(0, 0.1, size=(k, 3))
    logprobs = np.concatenate([moving[:, :4], constant, small, moving[:, 4:]], axis=1)
    logits = logprobs * 2.0 + 1.0 + np.outer(t, np.ones(logprobs.shape[1])) * 1e-3
    probes = [Probe("a", prompt_ids=[1], response_ids=[5] * 7), Probe("b", prompt_ids=[1], response_ids=[6] * 4)]
    summary = analyze_logprobs(steps, probes, logprobs, logits, min_logprob_change=0.2, filter="range")
    kept = np.r_[0:4, 9:11]
    expected = numpy_r2(logprobs[:, kept], steps)
    assert summary["n_tokens"] == 6 and summary["n_filtered"] == 5
    assert summary["filters"] == {"constant": 2, "min_logprob_change": 3}
    assert summary["median_r2"] == pytest.approx(float(np.median(expected)), abs=1e-12)
    assert summary["mean_r2"] == pytest.approx(float(expected.mean()), abs=1e-12)
    assert summary["frac_r2_gt_0_7"] == (expected > 0.7).sum() / 6
    assert summary["frac_r2_gt_0_9"] == (expected > 0.9).sum() / 6
    assert summary["logit"]["median_r2"] == pytest.approx(float(np.median(numpy_r2(logits[:, kept], steps))), abs=1e-12)
    means = np.stack([logprobs[:, :7].mean(1), logprobs[:, 7:].mean(1)], axis=1)
    np.testing.assert_allclose([r["r2"] for r in summary["response_rows"]], numpy_r2(means, steps), atol=1e-12)
    rows = summary["token_rows"]
    assert [r["filtered"] for r in rows] == [""] * 4 + ["constant"] * 2 + ["min_logprob_change"] * 3 + [""] * 2
    assert rows[4]["r2"] is None  # constant: no R², never NaN
    assert tuple(k for k in summary if k in PUBLIC_KEYS) == PUBLIC_KEYS
    with pytest.raises(UsageError, match="at least 3"):
        analyze_logprobs(steps[:2], probes, logprobs[:2], logits[:2])


def test_endpoint_and_range_filters_differ():
    """Hand-made series (threshold 0.25, exact binary fractions): the official filter keeps a token when
    |last - first| > 0.25; range keeps it when max - min >= 0.25."""
    steps = [0, 1, 2, 3]
    series = {
        "A": [-1.0, -1.5, -1.5, -1.125],  # moves 0.5 in between, 0.125 end to end: range only
        "B": [-1.0, -1.125, -1.25, -1.25],  # 0.25 both ways: range (>=) keeps it, endpoints (>) does not
        "C": [-2.0, -1.75, -1.5, -1.0],  # 1.0 both ways: both
        "D": [-1.0, -1.0625, -1.0, -1.0625],  # 0.0625: neither
        "E": [-3.0, -3.0, -3.0, -3.0],  # constant: neither
    }
    logprobs = np.array(list(series.values())).T
    probes = [Probe("p", prompt_ids=[1], response_ids=[5] * 5)]
    kept = {}
    for rule in ("endpoints", "range"):
        summary = analyze_logprobs(steps, probes, logprobs, logprobs * 2, min_logprob_change=0.25, filter=rule)
        kept[rule] = [name for name, row in zip(series, summary["token_rows"]) if not row["filtered"]]
        assert summary["filter"] == rule and summary["filters"]["constant"] == 1
        assert summary["median_r2"] == pytest.approx(float(np.median(numpy_r2(logprobs[:, [list(series).index(n) for n in kept[rule]]], steps))), abs=1e-12)
    assert kept == {"endpoints": ["C"], "range": ["A", "B", "C"]}
    rows = analyze_logprobs(steps, probes, logprobs, logprobs, min_logprob_change=0.25)["token_rows"]
    assert [r["change"] for r in rows] == [0.125, 0.25, 1.0, 0.0625, 0.0]  # |last - first| by default
    with pytest.raises(UsageError, match="filter must be one of"):
        analyze_logprobs(steps, probes, logprobs, logprobs, filter="max")


def test_cli_logprobs_run_dir(trajectory, tmp_path):
    root, _ = trajectory
    out_json = tmp_path / "lp.json"
    result_code, result_out, result_err = run_cli(
        "linearity", "logprobs", str(root), "--probes", str(root / "probes.jsonl"), "--json", str(out_json), "--min-logprob-change", "0.05", "--batch-size", "3"
    )
    assert result_code == 0, result_out + result_err
    data = json.loads(out_json.read_text())
    assert tuple(data) == PUBLIC_KEYS
    assert data["steps"] == STEPS
    out = root / "linearity" / "logprobs"
    for png in ("r2_hist.png", "response_logprob.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tokens = (out / "tokens.csv").read_text().splitlines()
    n_scored = data["n_tokens"] + data["n_filtered"]
    assert len(tokens) == n_scored + 1 and n_scored == 3 + 3 + 3 + 7 + 3
    assert "log-prob R² vs step" in result_out


def test_cli_logprobs_generate_from_task_and_errors(trajectory, tmp_path):
    root, _ = trajectory
    pairs = [a for s in STEPS[:3] for a in ("-c", f"{s}={root / 'checkpoints' / f'step_{s:06d}'}")]
    out = tmp_path / "gen"
    result_code, result_out, result_err = run_cli(
        "linearity",
        "logprobs",
        *pairs,
        "--generate",
        "3",
        "--task",
        "arithmetic",
        "--task-option",
        "n_test=5",
        "--max-new-tokens",
        "4",
        "--out",
        str(out),
        "--json",
        str(tmp_path / "g.json"),
        "--min-logprob-change",
        "0",
        "--no-plots",
    )
    assert result_code == 0, result_out + result_err
    generated = [json.loads(line) for line in (out / "probes.jsonl").read_text().splitlines()]
    assert len(generated) == 3 and all(1 <= len(g["response_ids"]) <= 4 for g in generated)
    assert generated[0]["source"].startswith("generated 0 (arithmetic:")
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["steps"] == STEPS[:3] and data["n_tokens"] + data["n_filtered"] == sum(len(g["response_ids"]) for g in generated)
    # Re-scoring the saved probes (token ids) gives the same numbers.
    again_code, again_out, again_err = run_cli(
        "linearity",
        "logprobs",
        *pairs,
        "--probes",
        str(out / "probes.jsonl"),
        "--out",
        str(tmp_path / "again"),
        "--json",
        str(tmp_path / "a.json"),
        "--min-logprob-change",
        "0",
        "--no-plots",
    )
    assert again_code == 0, again_out + again_err
    again = json.loads((tmp_path / "a.json").read_text())
    assert data.pop("score_eos") is False and again.pop("score_eos") is None  # sampled without EOS; given probes
    assert again == data and data["filter"] == "endpoints"

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "<bos>1+1=", "response": "2" * 40}) + "\n")
    result_code, result_out, result_err = run_cli("linearity", "logprobs", *pairs, "--probes", str(long), "--out", str(tmp_path / "x"))
    assert result_code == 2
    assert "probe long.jsonl:1" in result_err and "context of 32" in result_err
    two_code, two_out, two_err = run_cli("linearity", "logprobs", *pairs[:4], "--probes", str(root / "probes.jsonl"))
    assert two_code == 2 and "at least 3 checkpoints" in two_err


def test_generated_probes_leave_out_the_stop_token_unless_asked(tmp_path):
    """A model rigged so that after one or more free tokens it mostly says <eos>: sampled responses end with
    the stop token, which is scored only with --score-eos (the official scripts never score it)."""
    model, tokenizer = build_tiny_model(layers=1, hidden=32, heads=4, kv_heads=2, intermediate=64, max_position=32, seed=0, tie_embeddings=False)
    eos, seven = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("7")
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[eos, 0], model.lm_head.weight[seven, 0] = -8.0, 8.0
    pairs = []
    gen = torch.Generator().manual_seed(0)
    for step in (0, 1, 2):
        with torch.no_grad():
            for p in model.model.layers.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        path = tmp_path / f"step_{step}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        pairs += ["-c", f"{step}={path}"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "<bos>1+2="}) + "\n")
    runs = {}
    for flag in ("--no-score-eos", "--score-eos"):
        out = tmp_path / flag
        code, stdout, stderr = run_cli(
            "linearity",
            "logprobs",
            *pairs,
            "--probes",
            str(prompts),
            "--generate",
            "8",
            "--max-new-tokens",
            "6",
            flag,
            "--out",
            str(out),
            "--json",
            str(out / "s.json"),
            "--no-plots",
        )
        assert code == 0, stdout + stderr
        runs[flag] = ([json.loads(line)["response_ids"] for line in (out / "probes.jsonl").read_text().splitlines()], json.loads((out / "s.json").read_text()))
    without, summary_without = runs["--no-score-eos"]
    with_eos, summary_with = runs["--score-eos"]
    stopped = [ids for ids in with_eos if ids[-1] == eos]
    assert len(stopped) >= 4 and all(len(ids) >= 2 for ids in stopped)  # the rigging works: several stop after a token
    assert without == [ids[:-1] if ids[-1] == eos else ids for ids in with_eos]
    assert all(eos not in ids for ids in without)
    assert summary_without["score_eos"] is False and summary_with["score_eos"] is True
    scored = lambda s: s["n_tokens"] + s["n_filtered"]  # noqa: E731
    assert scored(summary_with) - scored(summary_without) == len(stopped)
    code, _, stderr = run_cli("linearity", "logprobs", *pairs, "--probes", str(prompts), "--score-eos", "--out", str(tmp_path / "x"))
    assert code == 2 and "--score-eos applies to sampled probes" in stderr
