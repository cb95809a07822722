#!/usr/bin/env bash
# The verl lane: verl 0.9.1 on CPU in its own virtual environment (torch stays 2.13.0+cpu; verl-core
# pins transformers to <5.11, so this env gets 5.10.x), then the tests marked `verl`.
# About 2 GB and 5 minutes to install the first time; the tests take about 3 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
VENV=${RLVRX_VERL_VENV:-.venv-verl}

if ! "$VENV/bin/python" -c "import verl" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q "verl[verl-core]==0.9.1" torch==2.13.0
fi
# Always (re)install this checkout, so the lane tests this tree and not an earlier one.
"$VENV/bin/pip" install -q -e ".[test]" torch==2.13.0
"$VENV/bin/python" -m pytest -m verl tests/ "$@"
