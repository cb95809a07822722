import math

import numpy as np
import pytest
import torch
from tinyqwen import VOCAB, tiny_qwen

from rlvrx.errors import UsageError
from rlvrx.generation import ModelSource, SamplingParams, generate, process_logits

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 15], [3, 3]]


@pytest.fixture(scope="module")
def model():
    return tiny_qwen(0)


def naive_decode(model, prompt, steps, stop_ids=()):
    """Reference: one prompt, no padding, no cache, a full forward pass per step, greedy."""
    seq = list(prompt)
    tokens, raw = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq])).logits[0, -1].double()
            tok = int(logits.argmax())
            tokens.append(tok)
            raw.append(float(torch.log_softmax(logits, -1)[tok]))
            seq.append(tok)
            if tok in stop_ids:
                return tokens, raw, "eos"
    return tokens, raw, "length"


# ------------------------------------------------------------------ process_logits on a fixed distribution

# Probabilities deliberately not sorted by token id, to catch mix-ups between sorted and vocabulary order.
P = np.array([0.15, 0.03, 0.5, 0.07, 0.25])
LOGITS = torch.tensor(np.log(P), dtype=torch.float32)


def expected(keep, probs=P):
    out = np.where(np.isin(np.arange(len(probs)), keep), probs, 0.0)
    return out / out.sum()


@pytest.mark.parametrize(
    "params, want",
    [
        (SamplingParams(temperature=1.0), P),
        (SamplingParams(top_k=2), expected([2, 4])),
        (SamplingParams(top_p=0.7), expected([2, 4])),  # 0.5 < 0.7 so 0.25 joins; 0.75 >= 0.7 stops
        (SamplingParams(top_p=0.8), expected([2, 4, 0])),  # 0.75 < 0.8 so 0.15 joins
        (SamplingParams(top_p=0.3), expected([2])),  # the top token alone already reaches 0.3
        (SamplingParams(top_p=0.95), expected([2, 4, 0, 3])),
        (SamplingParams(temperature=0.5), P**2 / (P**2).sum()),
        (SamplingParams(temperature=0.0), expected([2])),
    ],
)
def test_process_logits_matches_hand_computed(params, want):
    probs = process_logits(LOGITS, params).exp().numpy()
    np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-7)


def test_process_logits_combined_filters_in_order_and_per_row():
    # temperature 2 flattens P; then top-k 3 keeps {2,4,0}; then top-p 0.6 on the renormalised rest.
    tempered = np.sqrt(P) / np.sqrt(P).sum()
    top3 = expected([2, 4, 0], tempered)  # ~ [0.27, 0, 0.49, 0, 0.35] in vocabulary order
    assert top3[2] < 0.6 < top3[2] + top3[4]
    want = expected([2, 4], top3)
    params = SamplingParams(temperature=2.0, top_k=3, top_p=0.6)
    batch = torch.stack([LOGITS, LOGITS.flip(0)])  # second row: same distribution, reversed ids
    probs = process_logits(batch, params).exp().numpy()
    np.testing.assert_allclose(probs[0], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(probs[1], want[::-1], rtol=1e-5, atol=1e-7)
    assert process_logits(batch.to(torch.bfloat16), params).dtype == torch.float32


def _assert_frequencies(counts, probs, draws):
    freq = counts / draws
    sigma = np.sqrt(np.maximum(probs * (1 - probs), 1e-12) / draws)
    assert np.all(np.abs(freq - probs) <= 5 * sigma + 1e-12), (freq, probs)
    assert np.all(counts[probs == 0] == 0)


def test_empirical_first_token_frequencies_match_processed_distribution(model):
    params = SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=1, seed=123, stop_token_ids=())
    draws = 3000
    gens = generate(model, None, [[4, 8, 15]], n=draws, params=params)
    with torch.no_grad():
        logits = model(torch.tensor([[4, 8, 15]])).logits[0, -1]
    probs = process_logits(logits, params).exp().double().numpy()
    assert 2 <= (probs > 0).sum() < VOCAB  # the nucleus really cuts something here
    counts = np.bincount([g.token_ids[0] for g in gens], minlength=VOCAB)
    _assert_frequencies(counts, probs, draws)
    # reported log-probs are those of the processed distribution
    for g in gens[:50]:
        assert g.logprobs[0].item() == pytest.approx(math.log(probs[g.token_ids[0]]), abs=1e-5)


# ------------------------------------------------------------------ batched KV cache vs naive reference


@pytest.mark.parametrize("batch_size", [None, 2])
def test_greedy_batched_cache_equals_naive_loop(model, batch_size):
    steps = 12
    params = SamplingParams(temperature=0, max_new_tokens=steps, stop_token_ids=())
    gens = generate(model, None, PROMPTS, n=1, params=params, batch_size=batch_size)
    assert [g.prompt_index for g in gens] == list(range(len(PROMPTS)))
    for prompt, g in zip(PROMPTS, gens):
        ref_tokens, ref_raw, _ = naive_decode(model, prompt, steps)
        assert g.token_ids == ref_tokens
        assert g.prompt_ids == prompt
        np.testing.assert_allclose(g.raw_logprobs.numpy(), ref_raw, atol=1e-4)
        assert torch.all(g.logprobs == 0)  # greedy: the processed distribution is a point mass
        assert g.finish_reason == "length"


def _pick_stop_token(references):
    """A token that ends some greedy rows early (at different steps) and never appears in others."""
    for tok in range(VOCAB):
        firsts = [seq.index(tok) if tok in seq else None for seq in references]
        hits = [f for f in firsts if f is not None and f < len(references[0]) - 1]
        if len(set(hits)) >= 2 and any(f is None for f in firsts):
            return tok
    raise AssertionError("no suitable stop token in the reference outputs")


def test_rows_stop_at_eos_and_leave_the_batch(model):
    steps = 14
    references = [naive_decode(model, p, steps)[0] for p in PROMPTS]
    stop = _pick_stop_token(references)
    batch_rows = []
    hook = model.model.register_forward_pre_hook(lambda module, args, kwargs: batch_rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        gens = generate(model, None, PROMPTS, params=SamplingParams(temperature=0, max_new_tokens=steps, stop_token_ids=(stop,)))
    finally:
        hook.remove()
    reasons = set()
    for prompt, g in zip(PROMPTS, gens):
        ref_tokens, ref_raw, ref_reason = naive_decode(model, prompt, steps, stop_ids=(stop,))
        assert g.token_ids == ref_tokens
        assert g.finish_reason == ref_reason
        np.testing.assert_allclose(g.raw_logprobs.numpy(), ref_raw, atol=1e-4)
        if ref_reason == "eos":
            assert g.token_ids[-1] == stop and stop not in g.token_ids[:-1]
        else:
            assert len(g.token_ids) == steps
        reasons.add(g.finish_reason)
    assert reasons == {"eos", "length"}
    assert len({len(g.token_ids) for g in gens}) >= 3
    # finished rows stop costing compute: the decoding batch shrinks as rows end
    assert batch_rows[0] == len(PROMPTS)
    assert batch_rows == sorted(batch_rows, reverse=True)
    assert batch_rows[-1] == sum(g.finish_reason == "length" for g in gens)
    assert len(batch_rows) == steps  # prefill + steps - 1 decoding forwards


def test_sampling_is_seeded_and_independent_of_batch_layout(model):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=20, max_new_tokens=10, seed=7, stop_token_ids=(0, 1))
    first = generate(model, None, PROMPTS, n=3, params=params)
    again = generate(model, None, PROMPTS, n=3, params=params)
    chunked = generate(model, None, PROMPTS, n=3, params=params, batch_size=4)
    other_seed = generate(model, None, PROMPTS, n=3, params=SamplingParams(**{**params.__dict__, "seed": 8}))
    assert [g.token_ids for g in first] == [g.token_ids for g in again]
    for a, b in zip(first, again):
        assert torch.equal(a.logprobs, b.logprobs) and torch.equal(a.raw_logprobs, b.raw_logprobs)
    assert [g.token_ids for g in first] == [g.token_ids for g in chunked]
    assert [g.token_ids for g in first] != [g.token_ids for g in other_seed]
    # the n samples of a prompt differ from one another (independent streams)
    assert len({tuple(g.token_ids) for g in first if g.prompt_index == 1}) == 3
    assert len({len(g.token_ids) for g in first}) >= 2  # some rows stopped early
    for g in first:
        assert torch.all(torch.isfinite(g.logprobs)) and torch.all(g.logprobs <= 0)
        assert torch.all(torch.isfinite(g.raw_logprobs)) and torch.all(g.raw_logprobs <= 0)


def test_sampled_logprobs_match_teacher_forced_reference(model):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=8, seed=3, stop_token_ids=(2,))
    gens = generate(model, None, PROMPTS, n=2, params=params, batch_size=3)
    for g in gens:
        seq = torch.tensor([g.prompt_ids + g.token_ids])
        with torch.no_grad():
            logits = model(seq).logits[0, len(g.prompt_ids) - 1 : -1]
        targets = torch.tensor(g.token_ids)
        raw = torch.log_softmax(logits.double(), -1)[torch.arange(len(targets)), targets]
        processed = process_logits(logits, params)[torch.arange(len(targets)), targets]
        np.testing.assert_allclose(g.raw_logprobs.numpy(), raw.numpy(), atol=1e-4)
        np.testing.assert_allclose(g.logprobs.numpy(), processed.numpy(), atol=1e-4)


# ------------------------------------------------------------------ modes, dtypes, limits, errors


def test_train_mode_restored_and_no_graph(model):
    model.train()
    try:
        gens = generate(model, None, PROMPTS[:2], params=SamplingParams(max_new_tokens=4, seed=1, stop_token_ids=()))
        assert model.training
    finally:
        model.eval()
    lp = gens[0].logprobs
    assert not lp.requires_grad and not lp.is_inference()
    w = torch.ones(len(lp), requires_grad=True)
    (w * torch.exp(lp - lp.detach())).sum().backward()  # usable as "old log-probs" in a loss
    assert torch.allclose(w.grad, torch.ones_like(w))


def test_bf16_model_generates_float32_logprobs():
    model = tiny_qwen(0).to(torch.bfloat16)
    gens = generate(model, None, PROMPTS, params=SamplingParams(temperature=0, max_new_tokens=6, stop_token_ids=()))
    for prompt, g in zip(PROMPTS, gens):
        assert g.raw_logprobs.dtype == torch.float32 and len(g.token_ids) == 6
        ref_tokens, ref_raw, _ = naive_decode(model, prompt, 1)
        assert g.token_ids[0] == ref_tokens[0]
        assert abs(g.raw_logprobs[0].item() - ref_raw[0]) < 1e-3


def test_generation_stops_at_the_model_context():
    model = tiny_qwen(0, max_position=16)
    gens = generate(model, None, [list(range(1, 14)), [1, 2]], params=SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=()))
    assert [len(g.token_ids) for g in gens] == [3, 10]
    assert gens[0].finish_reason == "length"
    with pytest.raises(UsageError, match="prompt 0 has 16 tokens"):
        generate(model, None, [list(range(16))], params=SamplingParams(max_new_tokens=2))


def test_text_prompts_with_tokenizer_decode_and_default_eos():
    from rlvrx.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(layers=1, hidden=32, intermediate=64)
    params = SamplingParams(temperature=1.5, max_new_tokens=25, seed=0)  # stop ids: tokenizer eos
    gens = generate(model, tokenizer, ["<bos>12+34=", "<bos>7="], n=20, params=params)
    eos = tokenizer.eos_token_id
    assert gens[0].prompt_ids == tokenizer("<bos>12+34=", add_special_tokens=False)["input_ids"]
    assert any(g.finish_reason == "eos" for g in gens)
    for g in gens:
        assert g.text == tokenizer.decode(g.token_ids, skip_special_tokens=True)
        assert eos not in g.token_ids[:-1]
        assert (g.finish_reason == "eos") == (g.token_ids[-1] == eos)


def test_progress_counts_every_row(model):
    seen = []
    generate(model, None, PROMPTS, n=2, params=SamplingParams(max_new_tokens=5, stop_token_ids=(0, 1, 2)), batch_size=4, progress=seen.append)
    assert sum(seen) == 2 * len(PROMPTS)


def test_bad_input_is_a_usage_error(model):
    with pytest.raises(UsageError, match="prompt 1 is empty"):
        generate(model, None, [[1], []])
    with pytest.raises(UsageError, match="token id 40"):
        generate(model, None, [[1, 40]])
    with pytest.raises(UsageError, match="no tokenizer"):
        generate(model, None, ["text"])
    with pytest.raises(UsageError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(UsageError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(UsageError, match="at least|>= 1"):
        generate(model, None, [[1]], n=0)
    assert generate(model, None, []) == []
    assert ModelSource(model).vocab_size == VOCAB


# ------------------------------------------------------------------ top-p on a large vocabulary (staged search)


def _full_sort_top_p(logits, params):
    """Reference nucleus: a stable full sort of the whole row, the first position whose preceding mass
    reaches top_p ends the nucleus; log-probs renormalised over it (float64)."""
    lp = torch.log_softmax(logits.float() / params.temperature, dim=-1)
    values, order = torch.sort(lp, dim=-1, descending=True, stable=True)
    p = values.exp()
    drop = (p.cumsum(-1) - p) >= params.top_p
    drop[:, 0] = False
    out = torch.full(lp.shape, float("-inf"), dtype=torch.float64)
    for r in range(lp.shape[0]):
        cut = int(drop[r].to(torch.uint8).argmax()) if drop[r].any() else lp.shape[1]
        kept = order[r, :cut]
        out[r, kept] = torch.log_softmax(lp[r, kept].double(), dim=-1)
    return out


def test_staged_top_p_equals_a_full_sort_on_a_large_vocabulary(monkeypatch):
    import rlvrx.generation.logits as sampler

    gen = torch.Generator().manual_seed(0)
    # nuclei from 1 token to most of the vocabulary, plus exact ties at the top and across the cut
    logits = torch.cat([torch.randn(6, 3000, generator=gen) * s for s in (0.3, 2.0, 6.0, 20.0)])
    logits[0, :100] = 9.0
    logits[1] = logits[1].round()
    params = SamplingParams(temperature=0.6, top_p=0.9)
    staged = process_logits(logits, params)
    monkeypatch.setattr(sampler, "NUCLEUS_CANDIDATES", ())
    threshold_only = process_logits(logits, params)
    threshold = sampler._threshold_candidates

    def settles_nothing(lp, top_p):
        ok, *rest = threshold(lp, top_p)
        return (torch.zeros_like(ok), *rest)

    monkeypatch.setattr(sampler, "_threshold_candidates", settles_nothing)
    full = process_logits(logits, params)
    # bit-identical whichever stage settles a row
    assert torch.equal(staged, full) and torch.equal(threshold_only, full)
    sizes = torch.isfinite(staged).sum(-1)
    assert sizes.min() == 1 and (sizes > 1024).any() and ((sizes > 1) & (sizes < 64)).any()
    ref = _full_sort_top_p(logits, params)
    assert torch.equal(torch.isfinite(staged), torch.isfinite(ref))
    np.testing.assert_allclose(staged.exp().numpy(), ref.exp().numpy(), atol=1e-6)
    # a row on its own gets the same numbers as inside the batch
    assert all(torch.equal(process_logits(logits[r], params), staged[r]) for r in (0, 5, 13, 23))


def test_vectorised_row_seeds_equal_numpy_seed_sequence():
    from rlvrx.generation.rng import row_seeds

    rng = np.random.default_rng(1)
    for seed in [0, 3, 2**32 - 1, 2**32, 2**63 - 1, 98765432123]:
        i, j = rng.integers(0, 10**6, 50), rng.integers(0, 100, 50)
        want = [np.random.SeedSequence([seed, int(a), int(b)]).generate_state(1, np.uint64)[0] for a, b in zip(i, j)]
        assert row_seeds(seed, i, j).tolist() == [int(w) for w in want]


# ------------------------------------------------------------------ current KV cache API (no deprecation notices)


def test_cached_decoding_and_shared_prompt_scoring_use_the_current_cache_api(model):
    """Neither the sampler nor the shared-prompt scorer passes or reads a deprecated cache name."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    from rlvrx.generation import left_pad
    from rlvrx.generation.scoring import shared_prompt_token_logprobs

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    hf_root = logging.getLogger("transformers")
    hf_logging.warning_once.cache_clear()  # a notice shown earlier in the session would hide a new one
    hf_root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            params = SamplingParams(temperature=0, max_new_tokens=4, stop_token_ids=())
            generate(model, None, PROMPTS[:2], n=1, params=params)
            ids, mask = left_pad(PROMPTS[:2])
            responses = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
            shared_prompt_token_logprobs(model, ids, mask, torch.tensor([0, 0, 1]), responses, torch.ones_like(responses))
    finally:
        hf_root.removeHandler(handler)
    notices = records + [str(w.message) for w in caught]
    assert not [m for m in notices if "past_key_values" in m or "cache_params" in m], notices
