"""The settings of an evaluation other than its models and tasks (EvalOptions), checked when made.

Sampling values left None fall back to the defaults of rlvrx.generation.params (by device and
task); the engine is chosen by rlvrx.generation.engines.resolve_engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from rlvrx.errors import UsageError
from rlvrx.generation.engines import ENGINES
from rlvrx.generation.params import Sampling, resolve_sampling
from rlvrx.models import check_device
from rlvrx.tasks.base import Task
from rlvrx.tasks.build import task_max_new_tokens

__all__ = ["EvalOptions", "parse_ids", "sampling_for"]


@dataclass
class EvalOptions:
    """Everything but the models and tasks. None = the default for the device / task."""

    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    seed: int = 0
    engine: str = "auto"
    device: str = "auto"
    dtype: str | None = None
    batch_size: int | None = None  # problems per generation batch
    max_rows: int | None = None  # hf engine: rows (problem x sample) decoded at once
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # vllm: None = 0.9 on a GPU, a 1 GiB KV cache on CPU
    max_model_len: int | None = None
    workers: int | None = None
    grading_timeout: float | None = None
    limit: int | None = None
    ids: Sequence[str] | str | None = None
    overwrite: bool = False

    def __post_init__(self):
        for key in ("n", "max_new_tokens", "batch_size", "max_rows", "max_model_len", "workers"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UsageError(f"{key.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.tensor_parallel_size < 1:
            raise UsageError(f"tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise UsageError(f"gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.engine not in ENGINES:
            raise UsageError(f"unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        timeout = self.grading_timeout
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf):
            raise UsageError(f"grading-timeout must be a positive, finite number of seconds, got {timeout!r}")
        if self.device != "auto":
            check_device(self.device)


def sampling_for(task: Task, options: EvalOptions, gpu: bool) -> Sampling:
    """The sampling of one task: the options' values, the rest the defaults for the device and task."""
    return resolve_sampling(
        gpu=gpu,
        task_name=task.name,
        task_max_new_tokens=task_max_new_tokens(task),
        n=options.n,
        temperature=options.temperature,
        top_p=options.top_p,
        max_new_tokens=options.max_new_tokens,
        seed=options.seed,
    )


def parse_ids(ids) -> list[str] | None:
    """Problem ids as a list ('a,b' or a sequence); None (or none given) = all problems."""
    if ids is None:
        return None
    if isinstance(ids, str):
        ids = ids.split(",")
    out = [str(i).strip() for i in ids if str(i).strip()]
    return out or None
