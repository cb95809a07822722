import numpy as np
import pytest
import torch
from tinyqwen import VOCAB, tiny_qwen

from rlvrx.errors import UsageError
from rlvrx.generation import (
    SamplingParams,
    batch_token_logprobs,
    generate,
    pack_prompt_response,
    score_responses,
    token_logprobs,
)


@pytest.fixture(scope="module")
def model():
    return tiny_qwen(0)


def direct(model, prompt, response):
    """Reference: the sequence alone, one forward pass, float64 log-softmax gathered at the response."""
    seq = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(seq).logits[0].double()
    at = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1), torch.tensor(list(response), dtype=torch.long)
    return torch.log_softmax(logits, -1)[at], logits[at]


def random_pairs(seed, count):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, rng.integers(1, 12)).tolist() for _ in range(count)]
    responses = [rng.integers(0, VOCAB, rng.integers(1, 15)).tolist() for _ in range(count)]
    return prompts, responses


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_scores_equal_a_direct_forward_pass_per_sequence(model, batch_size):
    prompts, responses = random_pairs(0, 7)
    responses[2] = []  # an empty response scores to an empty tensor
    scores = score_responses(model, prompts, responses, batch_size=batch_size)
    assert len(scores) == len(prompts)
    for p, r, s in zip(prompts, responses, scores):
        ref_lp, ref_logit = direct(model, p, r)
        assert s.logprobs.shape == (len(r),) and s.logprobs.dtype == torch.float32
        np.testing.assert_allclose(s.logprobs.numpy(), ref_lp.numpy(), atol=1e-5)
        np.testing.assert_allclose(s.logits.numpy(), ref_logit.numpy(), atol=1e-5)
    plain = token_logprobs(model, prompts, responses, batch_size=batch_size)
    assert all(torch.equal(a, b.logprobs) for a, b in zip(plain, scores))


def test_scoring_agrees_with_the_sampler(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=10, seed=4, stop_token_ids=(0, 1))
    prompts = [[3, 4, 5], [9], [1, 2, 3, 4, 5, 6, 7]]
    gens = generate(model, None, prompts, n=2, params=params)
    scored = token_logprobs(model, [g.prompt_ids for g in gens], [g.token_ids for g in gens], batch_size=4)
    for g, lp in zip(gens, scored):
        np.testing.assert_allclose(lp.numpy(), g.raw_logprobs.numpy(), atol=1e-4)


def test_scoring_leaves_train_mode_and_returns_plain_tensors(model):
    model.train()
    try:
        out = token_logprobs(model, [[1, 2]], [[3, 4]])
        assert model.training
    finally:
        model.eval()
    assert not out[0].is_inference() and not out[0].requires_grad


def test_context_overflow_and_bad_input_are_usage_errors():
    model = tiny_qwen(0, max_position=16)
    with pytest.raises(UsageError, match="prompt 1 \\+ response has 17 tokens.*16"):
        token_logprobs(model, [[1], [1] * 10], [[2], [2] * 7])
    token_logprobs(model, [[1] * 10], [[2] * 6])  # exactly the context is fine
    with pytest.raises(UsageError, match="2 prompts but 1 responses"):
        token_logprobs(model, [[1], [2]], [[3]])
    with pytest.raises(UsageError, match="prompt 0 is empty"):
        token_logprobs(model, [[]], [[3]])
    with pytest.raises(UsageError, match="token id 40"):
        token_logprobs(model, [[1]], [[40]])


def test_pack_prompt_response_layout():
    packed = pack_prompt_response([[7, 8], [9]], [[1, 2, 3], []], pad_id=0)
    assert packed.input_ids.tolist() == [[7, 8, 1, 2, 3], [0, 9, 0, 0, 0]]
    assert packed.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert packed.response_mask.tolist() == [[1, 1, 1], [0, 0, 0]]
    assert packed.response_width == 3


def padded_batch(prompts, responses):
    packed = pack_prompt_response(prompts, responses)
    p_width = packed.input_ids.shape[1] - packed.response_width
    return packed.input_ids, packed.attention_mask, p_width, packed.response_width


def test_batch_token_logprobs_is_differentiable_and_exact(model):
    prompts, responses = random_pairs(1, 5)
    ids, mask, p_width, r_width = padded_batch(prompts, responses)
    full, entropy = batch_token_logprobs(model, ids, mask)
    assert full.shape == entropy.shape == (5, ids.shape[1] - 1)
    kept, kept_entropy = batch_token_logprobs(model, ids, mask, logits_to_keep=r_width)
    assert kept.shape == (5, r_width)
    torch.testing.assert_close(kept, full[:, -r_width:], atol=1e-5, rtol=0)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ref_lp, _ = direct(model, p, r)
        np.testing.assert_allclose(kept[i, : len(r)].detach().numpy(), ref_lp.numpy(), atol=1e-5)
        # entropy at the first response position from the direct forward pass
        with torch.no_grad():
            logits = model(torch.tensor([p])).logits[0, -1].double()
        probs = torch.softmax(logits, -1)
        ref_entropy = float(-(probs * probs.log()).sum())
        assert kept_entropy[i, 0].item() == pytest.approx(ref_entropy, abs=1e-5)
    assert torch.isfinite(full).all() and torch.isfinite(entropy).all()
    assert not entropy.requires_grad

    model.zero_grad()
    response_mask = pack_prompt_response(prompts, responses).response_mask
    assert response_mask.sum().item() == sum(map(len, responses))
    loss = -(kept * response_mask).sum() / response_mask.sum()
    loss.backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad()


def test_batch_token_logprobs_temperature_scales_logits(model):
    ids, mask, _, r_width = padded_batch([[1, 2, 3]], [[4, 5]])
    with torch.no_grad():
        hot, _ = batch_token_logprobs(model, ids, mask, logits_to_keep=r_width, temperature=0.5, with_entropy=False)
        logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits[0, 2:4].double() / 0.5
    ref = torch.log_softmax(logits, -1)[torch.arange(2), torch.tensor([4, 5])]
    np.testing.assert_allclose(hot[0].numpy(), ref.numpy(), atol=1e-5)
    with pytest.raises(UsageError, match="logits_to_keep"):
        batch_token_logprobs(model, ids, mask, logits_to_keep=ids.shape[1])
