"""The `vllm` generation engine: the same prompts in and `Generation` rows out as rlvrx.generation.generate,
sampled by vLLM's offline `LLM` on one or more GPUs (tensor_parallel_size).

API used (checked against vLLM's source, stable from 0.8 to current): `LLM(model=..., tensor_parallel_size,
dtype, seed, gpu_memory_utilization, max_model_len, enforce_eager, trust_remote_code, logprobs_mode)`,
`LLM.get_tokenizer()`, `LLM.generate(prompts, sampling_params: list[SamplingParams], use_tqdm=...)`
with prompts as `{"prompt_token_ids": [...]}` (TokensPrompt), and `SamplingParams(n, temperature, top_p,
top_k, max_tokens, seed, stop_token_ids, ignore_eos, logprobs)`. Outputs: RequestOutput.prompt_token_ids,
.outputs[i].token_ids / .text / .finish_reason ("stop" | "length") / .logprobs (per position, a
mapping token id -> Logprob with .logprob).

Text prompts are encoded here like the native engine does (add_special_tokens=False: prompts come
fully formatted). Seeds: request i gets seed (seed, i) so a prompt's samples do not depend on the
batch. Log-probs of the sampled tokens are requested only when asked for (`logprobs="raw"`: the
model's distribution before temperature/top-k/top-p, "processed": after them); otherwise the
Generation's logprob tensors are NaN. vLLM is imported lazily: importing this module needs no vLLM.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from rlvrx.errors import UsageError
from rlvrx.generation.sampler import Generation, SamplingParams

LOGPROB_MODES = {"raw": "raw_logprobs", "processed": "processed_logprobs"}


def require_vllm(need_gpu: bool = True):
    """The vllm module, or a UsageError saying what is missing (vLLM itself, or a CUDA GPU)."""
    try:
        import vllm
    except ImportError:
        raise UsageError(
            "the vllm engine needs vLLM: pip install 'rlvrx[vllm]' on a machine with a CUDA GPU "
            "(or use the native engine: --engine native)"
        ) from None
    if need_gpu and not torch.cuda.is_available():
        raise UsageError("the vllm engine needs a CUDA GPU and none is visible here; use the native engine (--engine native)")
    return vllm


def request_seed(seed: int | None, prompt_index: int) -> int | None:
    """A per-request seed from (seed, prompt index), so a prompt's samples do not depend on the batch."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), prompt_index]).generate_state(1, np.uint32)[0])


def sampling_kwargs(params: SamplingParams, n: int, prompt_index: int = 0, logprobs: bool = False) -> dict[str, Any]:
    """Keyword arguments of vllm.SamplingParams for rlvrx SamplingParams (one request)."""
    if n < 1:
        raise UsageError(f"number of samples per prompt must be >= 1, got {n}")
    kwargs: dict[str, Any] = {
        "n": n,
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        "top_k": int(params.top_k) if params.top_k > 0 else -1,
        "max_tokens": int(params.max_new_tokens),
        "seed": request_seed(params.seed, prompt_index),
    }
    if params.stop_token_ids is not None:
        if params.stop_token_ids:
            kwargs["stop_token_ids"] = list(params.stop_token_ids)
        else:
            kwargs["ignore_eos"] = True  # an empty tuple: never stop before max_new_tokens
    if logprobs:
        kwargs["logprobs"] = 0  # the sampled token's log-prob only
    return kwargs


def _finish_reason(reason: str | None) -> str:
    return {"stop": "eos", "length": "length"}.get(reason or "", str(reason))


def _sampled_logprobs(token_ids: Sequence[int], positions) -> torch.Tensor:
    if positions is None:
        return torch.full((len(token_ids),), math.nan, dtype=torch.float32)
    values = []
    for i, token in enumerate(token_ids):
        entry = positions[i][token]
        values.append(float(getattr(entry, "logprob", entry)))
    return torch.tensor(values, dtype=torch.float32)


def to_generations(outputs, logprobs: str | None = None) -> list[Generation]:
    """vLLM RequestOutputs (one per prompt, in order) -> Generation rows ordered by (prompt, sample)."""
    rows = []
    nan = lambda k: torch.full((k,), math.nan, dtype=torch.float32)  # noqa: E731
    for prompt_index, request in enumerate(outputs):
        for completion in sorted(request.outputs, key=lambda c: c.index):
            token_ids = list(completion.token_ids)
            sampled = _sampled_logprobs(token_ids, completion.logprobs) if logprobs else nan(len(token_ids))
            rows.append(
                Generation(
                    prompt_index=prompt_index,
                    sample_index=int(completion.index),
                    prompt_ids=list(request.prompt_token_ids or []),
                    token_ids=token_ids,
                    text=completion.text,
                    logprobs=sampled if logprobs == "processed" else nan(len(token_ids)),
                    raw_logprobs=sampled if logprobs == "raw" else nan(len(token_ids)),
                    finish_reason=_finish_reason(completion.finish_reason),
                )
            )
    return rows


class VLLMEngine:
    """One vLLM `LLM` over a checkpoint dir; `generate` mirrors rlvrx.generation.generate."""

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        trust_remote_code: bool = False,
        logprobs: str | None = None,
        **engine_kwargs,
    ):
        if logprobs is not None and logprobs not in LOGPROB_MODES:
            raise UsageError(f"logprobs {logprobs!r}: use None, 'raw' or 'processed'")
        if tensor_parallel_size < 1:
            raise UsageError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        vllm = require_vllm()
        if "distributed_executor_backend" not in engine_kwargs and tensor_parallel_size > torch.cuda.device_count():
            raise UsageError(
                f"tensor_parallel_size {tensor_parallel_size} needs that many GPUs; {torch.cuda.device_count()} visible"
            )
        self.logprobs = logprobs
        kwargs = dict(engine_kwargs)
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        if logprobs is not None:
            kwargs["logprobs_mode"] = LOGPROB_MODES[logprobs]
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=str(model),
            tensor_parallel_size=int(tensor_parallel_size),
            dtype=dtype,
            seed=seed,
            gpu_memory_utilization=float(gpu_memory_utilization),
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def encode(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        return [
            list(self.tokenizer.encode(p, add_special_tokens=False)) if isinstance(p, str) else [int(t) for t in p]
            for p in prompts
        ]

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        n: int = 1,
        params: SamplingParams | None = None,
        use_tqdm: bool = False,
        prompt_keys: Sequence[int] | None = None,
    ) -> list[Generation]:
        """prompt_keys: request i is seeded from (seed, prompt_keys[i]) instead of (seed, i)."""
        params = params or SamplingParams()
        prompt_ids = self.encode(prompts)
        if not prompt_ids:
            return []
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        sampling = [
            self._vllm.SamplingParams(**sampling_kwargs(params, n, i, logprobs=self.logprobs is not None))
            for i in (prompt_keys if prompt_keys is not None else range(len(requests)))
        ]
        outputs = self.llm.generate(requests, sampling, use_tqdm=use_tqdm)
        return to_generations(outputs, self.logprobs)
