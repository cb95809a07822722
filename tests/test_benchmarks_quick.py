"""Smoke coverage of benchmarks/*.py: each runs with --quick and ends with a RATIO line.

Checks that the scripts run (exit code 0, a ratio on the last line) and that what they check for
correctness holds (bit-identical extrapolation outputs, no grading verdict lost); never their speed.
Peer virtual environments are hidden, so the scripts take their no-peer path, as on a CI machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchdata import benchmark_file

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if not p.name.startswith("_"))
RATIO_LINE = re.compile(r"^RATIO( \S+=\d+(\.\d+)?x)+")

pytestmark = pytest.mark.slow


def run_quick(script: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["RLVRX_BENCH_MERGEKIT_VENV"] = str(tmp_path / "no-mergekit-venv")
    env["RLVRX_BENCH_TRL_VENV"] = str(tmp_path / "no-trl-venv")
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--quick", "--workdir", str(tmp_path / "work"), *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )


def test_every_benchmark_is_covered():
    assert set(SCRIPTS) == {"extrapolate_weights.py", "linearity_weights.py", "logits_extrapolation.py", "grpo_step.py", "grading.py", "rank1_extrapolation.py"}


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_run_ends_with_a_ratio(script, tmp_path):
    extra = ["--data", str(benchmark_file("math500"))] if script == "grading.py" else []
    proc = run_quick(script, tmp_path, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert RATIO_LINE.match(lines[-1]), lines[-1]
    out = proc.stdout
    if script == "extrapolate_weights.py":
        # mergekit hidden: rlvrx --all is compared with the naive float32 state-dict arithmetic
        match = re.search(r"rlvrx --all vs naive \(every tensor\): (\d+)/(\d+) tensors bit-identical", out)
        assert match and match.group(1) == match.group(2) and int(match.group(2)) == 26, out[-2000:]
        assert "skipped: no virtual environment" in out
    if script == "rank1_extrapolation.py":
        # RELEX absent: skipped with a message; rlvrx agrees with the float64 numpy SVD reference to 1 bf16 ulp
        assert "relex: skipped: no RELEX checkout" in out
        match = re.search(r"rlvrx vs numpy float64 SVD reference: (\d+)/(\d+) tensors bit-identical, max (\d+) ulp", out)
        assert match and int(match.group(2)) == 26 and int(match.group(3)) <= 1, out[-2000:]
    if script == "grading.py":
        assert "lost_to_timeout=0" in lines[-1] and "disagreements=0" in lines[-1]
    if script == "linearity_weights.py":
        # the three contestants analysed the same checkpoints and agree on where R² lies
        medians = [float(m) for m in re.findall(r"median R² ([0-9.]+)", out)]
        assert len(medians) == 3 and all(0.5 < m <= 1.0 for m in medians), out[-2000:]
    if script == "grpo_step.py":
        assert "trl: skipped" in out
