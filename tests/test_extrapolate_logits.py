"""`rlvrx extrapolate logits`: the mixed distribution, alpha 0/1 = single-model sampling, files, errors."""

import json

import numpy as np
import pytest
import torch
from tinyqwen import VOCAB, tiny_qwen
from clirun import run_cli

from rlvrx.errors import UsageError
from rlvrx.generation.generations import read_generations
from rlvrx.extrapolate.logits import (
    PROVENANCE_SUFFIX,
    LogitsOptions,
    check_same_tokenizer,
    extrapolate_logits,
    sample_extrapolated,
)
from rlvrx.generation import SamplingParams, combine_logits, generate
from rlvrx.tasks.arithmetic import extract_integer
from rlvrx.trajectory import Trajectory

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 15]]


@pytest.fixture(scope="module")
def pair():
    return tiny_qwen(0), tiny_qwen(1)


def next_token_logits(model, prompt):
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1].double()


# ------------------------------------------------------------------------------------ the mixed distribution


def test_combine_logits_by_hand():
    l0, l1 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    mixed = combine_logits(l0, l1, 2.0)  # l0 + 2 (l1 - l0) = [2, 1, -2]
    assert torch.allclose(mixed, torch.tensor([2.0, 1.0, -2.0]))
    probs = torch.softmax(mixed.double(), -1)
    e = np.exp([2.0, 1.0, -2.0])
    assert np.allclose(probs.numpy(), e / e.sum())  # = [0.7214, 0.2654, 0.0132]
    assert np.allclose(probs.numpy(), [0.72139918, 0.26538793, 0.01321289], atol=1e-8)
    assert torch.equal(combine_logits(l0, l1, 0.0), l0) and torch.equal(combine_logits(l0, l1, 1.0), l1)


def nucleus(probs, top_p):
    """Reference top-p: keep the most probable tokens until their mass reaches top_p (at least one)."""
    order = np.argsort(-probs, kind="stable")
    keep, mass = [], 0.0
    for token in order:
        if mass >= top_p:
            break
        keep.append(token)
        mass += probs[token]
    out = np.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


@pytest.mark.parametrize("alpha, temperature, top_p", [(2.0, 1.0, 1.0), (-0.5, 1.0, 1.0), (3.0, 0.6, 0.95)])
def test_first_token_frequencies_follow_the_mixed_distribution(pair, alpha, temperature, top_p):
    base, second = pair
    prompt = [3, 9, 4, 1]
    mixed = next_token_logits(base, prompt) + alpha * (next_token_logits(second, prompt) - next_token_logits(base, prompt))
    want = torch.softmax(mixed / temperature, -1).numpy()
    if top_p < 1:
        want = nucleus(want, top_p)
    rows = 4000
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=1, seed=11, stop_token_ids=())
    gens = sample_extrapolated(base, second, None, [prompt], alpha, rows, params)
    counts = np.bincount([g.token_ids[0] for g in gens], minlength=VOCAB)
    freq = counts / rows
    sigma = np.sqrt(want * (1 - want) / rows)
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-3), np.abs(freq - want).max()
    assert counts[want == 0].sum() == 0  # nothing outside the nucleus
    # The mixture really differs from either model alone (the test could not pass by sampling one of them).
    for model in pair:
        alone = torch.softmax(next_token_logits(model, prompt) / temperature, -1).numpy()
        assert np.abs(alone - want).max() > 0.05


# ------------------------------------------------------------------------------------ alpha 0 / 1


@pytest.mark.parametrize("alpha, which", [(0.0, 0), (1.0, 1)])
def test_alpha_zero_and_one_reproduce_single_model_sampling(pair, alpha, which):
    # Stop tokens 0-7 make rows finish at different steps, so both KV caches drop rows in lockstep.
    params = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=12, seed=5, stop_token_ids=tuple(range(8)))
    mixed = sample_extrapolated(*pair, None, PROMPTS, alpha, 3, params, batch_size=5)
    single = generate(pair[which], None, PROMPTS, n=3, params=params, batch_size=5)
    assert [(g.prompt_index, g.sample_index) for g in mixed] == [(g.prompt_index, g.sample_index) for g in single]
    assert [g.token_ids for g in mixed] == [g.token_ids for g in single]
    assert len({len(g.token_ids) for g in mixed}) > 1  # rows really finished at different steps
    # alpha = 2 samples something else with the same seed.
    other = sample_extrapolated(*pair, None, PROMPTS, 2.0, 3, params, batch_size=5)
    assert [g.token_ids for g in other] != [g.token_ids for g in single]


def test_greedy_extrapolation_matches_a_naive_two_model_loop(pair):
    base, second = pair
    alpha, steps = 2.5, 8
    for prompt in PROMPTS:
        seq, want = list(prompt), []
        for _ in range(steps):
            l0, l1 = next_token_logits(base, seq), next_token_logits(second, seq)
            token = int((l0 + alpha * (l1 - l0)).argmax())
            want.append(token)
            seq.append(token)
        got = sample_extrapolated(base, second, None, [prompt], alpha, 1, SamplingParams(temperature=0, max_new_tokens=steps, stop_token_ids=()))
        assert got[0].token_ids == want


# ------------------------------------------------------------------------------------ errors


def test_vocabulary_and_tokenizer_mismatch(pair):
    from transformers import Qwen2Tokenizer

    from rlvrx.tiny import char_tokenizer

    with pytest.raises(UsageError, match="vocabulary"):
        sample_extrapolated(pair[0], tiny_qwen(2, vocab=VOCAB + 1), None, PROMPTS, 2.0, 1, SamplingParams(max_new_tokens=2))
    a = char_tokenizer()
    vocab = dict(a.get_vocab())
    swapped = {tok: idx for tok, idx in vocab.items()}
    t1, t2 = sorted(vocab, key=vocab.get)[5:7]
    swapped[t1], swapped[t2] = vocab[t2], vocab[t1]
    b = Qwen2Tokenizer(vocab=swapped, merges=[], unk_token=None, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    with pytest.raises(UsageError, match=f"token {t1!r} has id {vocab[t1]} in A but id {vocab[t2]} in B"):
        check_same_tokenizer(a, b, "A", "B")
    check_same_tokenizer(a, char_tokenizer(), "A", "B")


def test_prompt_longer_than_context(pair):
    short = tiny_qwen(3, max_position=8), tiny_qwen(4, max_position=8)
    with pytest.raises(UsageError, match="problem p-long: its prompt has 9 tokens.*context of 8"):
        sample_extrapolated(*short, None, [[1, 2], list(range(1, 10))], 2.0, 1, SamplingParams(max_new_tokens=2), names=["p-short", "p-long"])


# ------------------------------------------------------------------------------------ the command


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from rlvrx.tiny import save_tiny_model

    run = tmp_path_factory.mktemp("logits") / "run"
    traj = Trajectory.load(run, create=True)
    for step, seed in ((0, 0), (10, 1)):
        path = save_tiny_model(run / "checkpoints" / f"step_{step:06d}", seed=seed, layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64)
        traj.add(step, path)
    traj.save()
    return run


def test_extrapolate_logits_writes_gradeable_generations(tiny_run):
    res = extrapolate_logits(tiny_run, task="arithmetic", base=0, second=10, target=30, options=LogitsOptions(k=3, limit=5, seed=1))
    out = tiny_run / "extrapolated" / "logits-s0-s10-t30" / "arithmetic.jsonl"
    assert res.out == out and res.alpha == 3.0
    records = read_generations(out)
    assert len(records) == 5 and all(len(r.completions) == 3 for r in records)
    assert records[0].extra["task"] == "arithmetic" and len(records[0].extra["num_tokens"]) == 3
    # Metrics by hand from the file with the arithmetic verifier.
    correct = [[extract_integer(c) == str(int(r.gold)) for c in r.completions] for r in records]
    assert res.metrics["avg"] == pytest.approx(np.mean([np.mean(c) for c in correct]))
    assert res.metrics["pass@3"] == pytest.approx(np.mean([any(c) for c in correct]))
    assert res.metrics["problems"] == 5 and res.sampling["temperature"] == 0.6 and res.sampling["top_p"] == 0.95
    prov = json.loads(out.with_name("arithmetic" + PROVENANCE_SUFFIX).read_text())
    assert prov["alpha"] == 3.0 and [i["step"] for i in prov["inputs"]] == [0, 10]
    with pytest.raises(UsageError, match="already exists"):
        extrapolate_logits(tiny_run, task="arithmetic", base=0, second=10, target=30, options=LogitsOptions(k=3, limit=5))


def test_alpha_zero_pipeline_equals_base_model_sampling(tiny_run, tmp_path):
    from rlvrx.tasks.registry import get_task
    from rlvrx.models import load_pretrained

    opts = LogitsOptions(k=2, limit=4, seed=3, temperature=1.0, top_p=1.0, grade=False)
    res = extrapolate_logits(tiny_run, task="arithmetic", base=0, second=10, target=0, out=tmp_path / "g.jsonl", options=opts)
    assert res.metrics is None and res.warnings and "backwards" not in res.warnings[0]
    model, tokenizer = load_pretrained(tiny_run / "checkpoints" / "step_000000", torch.device("cpu"))
    task = get_task("arithmetic")
    examples = task.test_examples()[:4]
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=res.sampling["max_new_tokens"], seed=3)
    single = generate(model, tokenizer, [task.encode_prompt(e, tokenizer) for e in examples], n=2, params=params, batch_size=256)
    assert [g.token_ids for g in res.generations] == [g.token_ids for g in single]


def test_request_errors(tiny_run, tmp_path):
    ck = tiny_run / "checkpoints"
    with pytest.raises(UsageError, match="^alpha needs two checkpoints"):
        extrapolate_logits(task="arithmetic", base_path=ck / "step_000000", alpha=2.0, out=tmp_path / "x.jsonl")
    with pytest.raises(UsageError, match="^alpha needs two checkpoints"):
        extrapolate_logits(tiny_run, task="arithmetic", base=0, alpha=2.0)
    with pytest.raises(UsageError, match="^alpha needs two different checkpoints"):
        extrapolate_logits(task="arithmetic", base_path=ck / "step_000000", second_path=ck / "step_000000", alpha=2.0, out=tmp_path / "x.jsonl")
    with pytest.raises(UsageError, match="both step 10"):
        extrapolate_logits(tiny_run, task="arithmetic", base=10, second=10, target=30)
    with pytest.raises(UsageError, match="unknown task"):
        extrapolate_logits(tiny_run, task="arithmetc", base=0, second=10, target=30)


def test_cli_logits(tiny_run, tmp_path):

    summary = tmp_path / "s.json"
    result_code, result_out, result_err = run_cli(
        "extrapolate",
        "logits",
        str(tiny_run),
        "--base",
        "0",
        "--second",
        "10",
        "--target",
        "20",
        "--task",
        "arithmetic",
        "-k",
        "2",
        "--limit",
        "3",
        "--out",
        str(tmp_path / "g"),
        "--json",
        str(summary),
    )
    assert result_code == 0, result_out + result_err
    assert "pass@1" in result_out and "pass@2" in result_out
    data = json.loads(summary.read_text())
    assert data["alpha"] == 2.0 and data["problems"] == 3 and data["metrics"]["n"] == 2
    assert data["out"] == str(tmp_path / "g" / "arithmetic.jsonl")  # --out is a directory, like every command's
    assert len(read_generations(tmp_path / "g" / "arithmetic.jsonl")) == 3


def test_cli_logits_out_must_be_a_directory(tiny_run, tmp_path):
    taken = tmp_path / "g.jsonl"
    taken.write_text("")
    code, out, err = run_cli(
        "extrapolate",
        "logits",
        str(tiny_run),
        "--base",
        "0",
        "--second",
        "10",
        "--target",
        "20",
        "--task",
        "arithmetic",
        "-k",
        "1",
        "--limit",
        "1",
        "--out",
        str(taken),
    )
    assert code == 2
    assert f"--out is a directory (it receives <task>.jsonl); {taken} is a file" in out + err
    assert taken.read_text() == ""
