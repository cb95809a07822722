#!/usr/bin/env bash
# The no-compiler lane: rlvrx installed where no C compiler works (CC=/bin/false; MSVC is the same case)
# must install without its compiled kernels and give the same results through the fallback (numpy block
# reducer, torch.lerp). A copy of the tree without built objects (the main lane's editable install leaves
# rlvrx/kernels/_native*.so in this checkout), a fresh venv, then the weight linearity and extrapolation tests.
# Deselected: the tests of the kernels themselves, and "bf16 extrapolation never imports torch" (the
# fallback is torch.lerp).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
TREE=$(mktemp -d)
trap 'rm -rf "$TREE"' EXIT
tar -c --exclude='*.so' --exclude='__pycache__' pyproject.toml README.md rlvrx tests | tar -x -C "$TREE"
cd "$TREE"
python3 -m venv .venv
.venv/bin/pip install -q torch==2.13.0
CC=/bin/false .venv/bin/pip install -q -e ".[test]" torch==2.13.0
if .venv/bin/python -c "import rlvrx.kernels._native" 2>/dev/null; then
    echo "no-compiler lane: rlvrx.kernels._native was built with CC=/bin/false" >&2
    exit 1
fi
RLVRX_NO_COMPILER=1 .venv/bin/python -m pytest -p no:cacheprovider \
    tests/test_kernel_fallback.py tests/test_linearity_weights.py tests/test_extrapolate_weights.py \
    --deselect tests/test_linearity_weights.py::test_kernel_widths_give_the_same_bits \
    --deselect tests/test_extrapolate_weights.py::test_compiled_lerp_is_torch_lerp_bit_for_bit \
    --deselect tests/test_extrapolate_weights.py::test_bf16_extrapolation_runs_without_torch "$@"
