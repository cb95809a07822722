import numpy as np
import pytest
import torch

from rlvrx.errors import UsageError
from rlvrx.generation import ExtrapolatedSource, SamplingParams, generate, left_pad, process_logits
from tinyqwen import tiny_qwen

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 15]]
PAPER = dict(temperature=0.6, top_p=0.95)  # the paper's decoding defaults


@pytest.fixture(scope="module")
def models():
    base = tiny_qwen(0)
    # "second" = base moved a little, like a later checkpoint of the same run
    second = tiny_qwen(0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return base, second


def _same(a, b):
    assert [(g.prompt_index, g.sample_index, g.token_ids, g.finish_reason) for g in a] == [
        (g.prompt_index, g.sample_index, g.token_ids, g.finish_reason) for g in b
    ]
    for x, y in zip(a, b):
        assert torch.equal(x.logprobs, y.logprobs) and torch.equal(x.raw_logprobs, y.raw_logprobs)


@pytest.mark.parametrize("alpha, which", [(0.0, 0), (1.0, 1)])
def test_alpha_endpoints_reproduce_single_model_sampling(models, alpha, which):
    params = SamplingParams(**PAPER, max_new_tokens=12, seed=11, stop_token_ids=(0, 1, 2))
    single = generate(models[which], None, PROMPTS, n=3, params=params, batch_size=5)
    mixed = generate(ExtrapolatedSource(*models, alpha), None, PROMPTS, n=3, params=params, batch_size=5)
    _same(single, mixed)
    assert len({len(g.token_ids) for g in single}) >= 2  # rows left the batch at different steps
    other = generate(models[1 - which], None, PROMPTS, n=3, params=params, batch_size=5)
    assert [g.token_ids for g in other] != [g.token_ids for g in single]  # the endpoints do differ


def _forward_last(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].double()


def test_alpha_two_first_step_is_the_hand_formula(models):
    base, second = models
    source = ExtrapolatedSource(base, second, 2.0)
    input_ids, mask = left_pad(PROMPTS)
    with torch.inference_mode():
        combined = source.prefill(input_ids, mask)
    source.close()
    for row, prompt in enumerate(PROMPTS):
        l_b, l_s = _forward_last(base, prompt), _forward_last(second, prompt)
        want = l_b + 2.0 * (l_s - l_b)
        np.testing.assert_allclose(combined[row].double().numpy(), want.numpy(), atol=1e-4)
        # and the sampling distribution built from it
        got = process_logits(combined[row], SamplingParams(**PAPER)).exp()
        ref = process_logits(want, SamplingParams(**PAPER)).exp()
        np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-5)
        assert not torch.allclose(torch.softmax(want, -1), torch.softmax(l_s, -1), atol=1e-2)


def test_alpha_two_every_step_matches_separate_forward_passes(models):
    base, second = models
    params = SamplingParams(**PAPER, max_new_tokens=10, seed=5, stop_token_ids=(0, 1, 2, 3))
    gens = generate(ExtrapolatedSource(base, second, 2.0), None, PROMPTS, n=2, params=params, batch_size=3)
    assert len({len(g.token_ids) for g in gens}) >= 2
    for g in gens:
        seq = torch.tensor([g.prompt_ids + g.token_ids])
        with torch.no_grad():
            l_b = base(seq).logits[0, len(g.prompt_ids) - 1 : -1].double()
            l_s = second(seq).logits[0, len(g.prompt_ids) - 1 : -1].double()
        hand = l_b + 2.0 * (l_s - l_b)
        at = torch.arange(len(g.token_ids)), torch.tensor(g.token_ids)
        np.testing.assert_allclose(g.raw_logprobs.numpy(), torch.log_softmax(hand, -1)[at].numpy(), atol=1e-4)
        np.testing.assert_allclose(g.logprobs.numpy(), process_logits(hand, params)[at].numpy(), atol=1e-4)


def test_greedy_alpha_two_picks_the_argmax_of_the_formula(models):
    base, second = models
    gens = generate(ExtrapolatedSource(base, second, 2.0), None, PROMPTS, params=SamplingParams(temperature=0, max_new_tokens=1))
    for prompt, g in zip(PROMPTS, gens):
        l_b, l_s = _forward_last(base, prompt), _forward_last(second, prompt)
        assert g.token_ids == [int((l_b + 2 * (l_s - l_b)).argmax())]


def test_vocabulary_mismatch_is_a_usage_error(models):
    with pytest.raises(UsageError, match=r"40 tokens.*41"):
        ExtrapolatedSource(models[0], tiny_qwen(0, vocab=41), 2.0)


def test_training_flags_restored(models):
    base, second = models
    second.train()
    try:
        generate(ExtrapolatedSource(base, second, 0.5), None, PROMPTS[:1], params=SamplingParams(max_new_tokens=2))
        assert second.training and not base.training
    finally:
        second.eval()
