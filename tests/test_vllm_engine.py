"""The vllm engine: clear errors without vLLM or a GPU, rlvrx sampling settings -> vllm.SamplingParams
arguments, vLLM outputs -> Generation rows; on a GPU with vLLM, greedy output equals the native engine's."""

from __future__ import annotations

import importlib.util
import math
from types import SimpleNamespace

import pytest
import torch

from rlvrx.errors import UsageError
from rlvrx.generation import SamplingParams
from rlvrx.generation.vllm_engine import VLLMEngine, request_seed, require_vllm, sampling_kwargs, to_generations

HAS_VLLM = importlib.util.find_spec("vllm") is not None
HAS_GPU = torch.cuda.is_available()


@pytest.mark.skipif(HAS_VLLM and HAS_GPU, reason="vLLM and a GPU are present")
def test_selecting_vllm_without_it_or_without_a_gpu_is_a_usage_error():
    expected = "needs a CUDA GPU" if HAS_VLLM else "pip install 'rlvrx\\[vllm\\]'"
    with pytest.raises(UsageError, match=expected):
        require_vllm()
    with pytest.raises(UsageError, match=expected):
        VLLMEngine("/no/such/model")


def test_sampling_settings_map_onto_vllm_names():
    params = SamplingParams(temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=32, seed=7)
    kw = sampling_kwargs(params, n=16, prompt_index=3)
    assert kw == {"n": 16, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "max_tokens": 32, "seed": request_seed(7, 3)}
    assert sampling_kwargs(SamplingParams(top_k=5), 1)["top_k"] == 5
    assert sampling_kwargs(SamplingParams(stop_token_ids=()), 1)["ignore_eos"] is True
    assert sampling_kwargs(SamplingParams(stop_token_ids=(2, 9)), 1)["stop_token_ids"] == [2, 9]
    assert sampling_kwargs(params, 1, logprobs=True)["logprobs"] == 0
    assert sampling_kwargs(SamplingParams(seed=None), 1)["seed"] is None
    seeds = {request_seed(7, i) for i in range(100)}
    assert len(seeds) == 100 and request_seed(7, 3) == request_seed(7, 3) != request_seed(8, 3)
    with pytest.raises(UsageError, match="samples per prompt"):
        sampling_kwargs(params, 0)


def _completion(index, token_ids, text, reason, logprobs=None):
    return SimpleNamespace(index=index, token_ids=token_ids, text=text, finish_reason=reason, logprobs=logprobs)


def test_vllm_outputs_become_generations_in_prompt_sample_order():
    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731  (vllm.logprobs.Logprob has .logprob)
    outputs = [
        SimpleNamespace(prompt_token_ids=[1, 5], outputs=[
            _completion(1, [7, 2], "7", "stop", [{7: lp(-0.5)}, {2: lp(-0.25)}]),
            _completion(0, [8, 9, 4], "894", "length", [{8: lp(-1.0), 3: lp(-9.0)}, {9: lp(-2.0)}, {4: lp(-3.0)}]),
        ]),
        SimpleNamespace(prompt_token_ids=[1, 6], outputs=[_completion(0, [2], "", "stop", [{2: lp(-0.125)}])]),
    ]
    rows = to_generations(outputs, logprobs="raw")
    assert [(g.prompt_index, g.sample_index) for g in rows] == [(0, 0), (0, 1), (1, 0)]
    assert [g.finish_reason for g in rows] == ["length", "eos", "eos"]
    assert rows[0].token_ids == [8, 9, 4] and rows[0].prompt_ids == [1, 5] and rows[1].text == "7"
    assert rows[0].raw_logprobs.tolist() == [-1.0, -2.0, -3.0] and rows[2].raw_logprobs.tolist() == [-0.125]
    assert all(math.isnan(v) for v in rows[0].logprobs.tolist())  # processed ones were not asked for
    plain = to_generations(outputs)
    assert all(math.isnan(v) for g in plain for v in g.raw_logprobs.tolist()) and len(plain[0].raw_logprobs) == 3


@pytest.mark.skipif(not (HAS_VLLM and HAS_GPU), reason="needs vLLM and a CUDA GPU")
def test_greedy_vllm_equals_native_greedy(tmp_path):
    from rlvrx.generation import generate
    from rlvrx.tiny import build_tiny_model, save_tiny_model

    path = save_tiny_model(tmp_path / "tiny", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, max_position=128)
    model, tokenizer = build_tiny_model(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, max_position=128)
    prompts = [[tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]] for p in ("12+34=", "7+8=", "99+1=")]
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    native = generate(model, tokenizer, prompts, n=1, params=params)
    engine = VLLMEngine(str(path), dtype="float32", gpu_memory_utilization=0.3, enforce_eager=True)
    fast = engine.generate(prompts, n=1, params=params)
    assert [g.token_ids for g in fast] == [g.token_ids for g in native]
