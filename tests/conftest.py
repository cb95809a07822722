"""Shared fixtures: a tiny local HF model dir and writers of synthetic checkpoints.

Fixtures (names kept generic so every test file can use them; test files may still define their own):
- tiny_model_kwargs: the build arguments of the shared tiny model (pass to rlvrx.tiny.build_tiny_model).
- tiny_model_dir: session-scoped HF dir made by rlvrx.tiny.save_tiny_model(**tiny_model_kwargs). Read only.
- write_safetensors_checkpoint: function(dir, tensors, shards=1, source_dir=None) -> dir, written with
  safetensors.torch.save_file (independent of rlvrx's own writer); shards > 1 adds an index file.
- sft_model: session-scoped checkpoint dir of a 1-layer tiny model after a short SFT warm-up on 1-digit
  arithmetic (TINY_TASK): it gets some answers right, so GRPO groups carry signal.
- checkpoint_series: function(root, steps, name="step_{step}", seed=0) -> {step: dir}; checkpoints of the
  tiny model whose every tensor moves exactly linearly: W(step) = W(0) + step * D (float32).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

TINY_KWARGS = dict(layers=2, hidden=32, heads=4, kv_heads=2, intermediate=64, max_position=64, seed=0)
TINY_TASK = {"name": "arithmetic", "digits": 1, "n_train": 60, "n_test": 12}
AUX = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="session")
def tiny_model_kwargs() -> dict:
    return dict(TINY_KWARGS)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from rlvrx.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", **TINY_KWARGS)


@pytest.fixture(scope="session")
def sft_model(tmp_path_factory) -> Path:
    from rlvrx.config import validate_recipe
    from rlvrx.train.trainer import Trainer

    out = tmp_path_factory.mktemp("sft")
    raw = {
        "model": {"tiny": {"layers": 1, "hidden": 32, "heads": 2, "kv_heads": 1, "intermediate": 64, "max_position": 24}},
        "task": dict(TINY_TASK),
        "sft": {"steps": 100, "batch_size": 16, "lr": 3e-3},
        "grpo": {"steps": 0, "eval_examples": 12},
        "output": {"dir": str(out / "run")},
    }
    Trainer(validate_recipe(raw)).fit(show_progress=False)
    return out / "run" / "checkpoints" / "step_000000"


def _write_safetensors_checkpoint(directory, tensors: dict[str, torch.Tensor], shards: int = 1, source_dir=None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k in range(shards):
            part = names[k::shards]
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(directory / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    if source_dir is not None:
        for name in AUX:
            if (Path(source_dir) / name).is_file():
                shutil.copyfile(Path(source_dir) / name, directory / name)
    return directory


@pytest.fixture
def write_safetensors_checkpoint():
    return _write_safetensors_checkpoint


@pytest.fixture
def checkpoint_series(tiny_model_dir):
    from safetensors.torch import load_file

    base = load_file(str(tiny_model_dir / "model.safetensors"))

    def make(root, steps, name: str = "step_{step}", seed: int = 0) -> dict[int, Path]:
        gen = torch.Generator().manual_seed(seed)
        direction = {k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in base.items()}
        out = {}
        for step in steps:
            tensors = {k: base[k] + step * direction[k] for k in base}
            out[step] = _write_safetensors_checkpoint(Path(root) / name.format(step=step), tensors, source_dir=tiny_model_dir)
        return out

    return make


# A lane (`.ci/vllm-lane.sh`, `.ci/verl-lane.sh`) sets RLVRX_LANE: its library is installed there, so a
# test that skips (an importorskip, a skipif) hides a broken install or a broken test: it fails instead.
# A lane names its own test files (tests/test_<lane>*.py): a module skipped at collection fails too.
LANE = __import__("os").environ.get("RLVRX_LANE", "")


def _skip_is_failure(report, what: str) -> None:
    if LANE and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"{what} skipped in the {LANE} lane, where it must run: {report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _skip_is_failure(outcome.get_result(), item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _skip_is_failure(outcome.get_result(), collector.nodeid)
