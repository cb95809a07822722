"""Shared machinery of the benchmark scripts: child processes with sampled private memory, repeats,
page-cache control, machine description, peer virtual environments and synthetic checkpoints.

Peak memory is private anonymous memory (RssAnon from /proc/<pid>/status), summed over the child and
its descendants and sampled every few milliseconds: safetensors maps its files, so plain RSS would
count the page cache. Timings are wall-clock seconds of the whole child process unless a script
says otherwise (the child may also report an inner figure as JSON on its last stdout line).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data" / "benchmarks"
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# ----------------------------------------------------------------------------------------------
# Machine


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_info() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": mem_gib,
        "python": platform.python_version(),
        "loadavg_start": loadavg(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def drop_caches() -> bool:
    """sync; echo 3 > /proc/sys/vm/drop_caches. False (and nothing dropped) without permission."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def evict_files(paths: Sequence[Path]) -> None:
    """Drop the page cache of just these files (posix_fadvise DONTNEED); cold runs without root."""
    for root in paths:
        files = [root] if Path(root).is_file() else [p for p in Path(root).rglob("*") if p.is_file()]
        for file in files:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ----------------------------------------------------------------------------------------------
# Child processes


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                try:
                    children = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                except OSError:
                    continue
                todo.extend(int(c) for c in children)
        except OSError:
            pass
    return out


def _rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Run:
    contestant: str
    wall_s: float
    peak_anon: int
    rc: int
    cpu_s: float = 0.0  # user + system of the child and the descendants it waited for
    cold: bool = False
    load: str = ""
    inner: dict = field(default_factory=dict)  # JSON the child printed on its last stdout line
    stdout: str = ""
    stderr: str = ""


def run_child(
    name: str,
    cmd: Sequence[str],
    *,
    env: dict | None = None,
    cwd: str | os.PathLike | None = None,
    interval: float = 0.005,
    timeout: float | None = None,
    cold: bool = False,
) -> Run:
    """Run cmd, sampling the process tree's RssAnon; the last stdout line is parsed as JSON if it is one.

    Dirty pages left by the previous contestant are written out first (untimed), so that nobody's
    time includes the disk writing someone else's output."""
    import tempfile

    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    os.sync()
    load = loadavg()
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        start = time.perf_counter()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=out_f, stderr=err_f, env=full_env, cwd=cwd, text=True)
        peak = 0
        stop = threading.Event()

        def sample():
            nonlocal peak
            while not stop.is_set():
                total = sum(_rss_anon(p) for p in _descendants(proc.pid))
                peak = max(peak, total)
                stop.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        killer = threading.Timer(timeout, proc.kill) if timeout else None
        if killer:
            killer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if killer:
            killer.cancel()
        stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    inner = {}
    lines = [line for line in out.strip().splitlines() if line.strip()]
    if lines:
        try:
            parsed = json.loads(lines[-1])
            inner = parsed if isinstance(parsed, dict) else {}
        except json.JSONDecodeError:
            pass
    return Run(name, wall, peak, proc.returncode, usage.ru_utime + usage.ru_stime, cold, load, inner, out, err)


def check_ok(run: Run) -> Run:
    if run.rc != 0:
        tail = (run.stderr or run.stdout).strip().splitlines()[-15:]
        raise SystemExit(f"{run.contestant} failed with exit code {run.rc}:\n" + "\n".join(tail))
    return run


# ----------------------------------------------------------------------------------------------
# Statistics and reporting


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{min(values):.2f}-{max(values):.2f}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def summarize_runs(runs: Sequence[Run], key: Callable[[Run], float] = lambda r: r.wall_s) -> dict:
    values = [key(r) for r in runs]
    return {
        "n": len(values),
        "median": median(values),
        "min": min(values) if values else math.nan,
        "max": max(values) if values else math.nan,
        "values": [round(v, 4) for v in values],
        "cpu_median": median([r.cpu_s for r in runs]),
        "cpu_values": [round(r.cpu_s, 3) for r in runs],
        "peak_anon_median": median([r.peak_anon for r in runs]),
        "peak_anon_max": max((r.peak_anon for r in runs), default=0),
        "loads": [r.load for r in runs],
    }


CACHE_TABLE_HEADER = ("cache", "contestant", "median s", "range s", "cpu s", "peak anon", "load avg at start of each run")


def print_run(tag: str, name: str, run: Run) -> None:
    print(f"  {tag:7s} {name:13s} {run.wall_s:7.2f} s  cpu {run.cpu_s:6.2f} s  anon {mib(run.peak_anon):>9s}  load {run.load}", flush=True)


def summarize_cache_modes(runs: Sequence[Run], contestants: Iterable[str], modes: Sequence[bool]) -> tuple[dict, list]:
    """({"warm"|"cold": {contestant: summarize_runs(...)}}, rows under CACHE_TABLE_HEADER)."""
    summary, rows = {}, []
    for cold in modes:
        label = "cold" if cold else "warm"
        block = summary[label] = {}
        for name in contestants:
            s = block[name] = summarize_runs([r for r in runs if r.contestant == name and r.cold == cold])
            rows.append([label, name, f"{s['median']:.2f}", spread(s["values"]), f"{s['cpu_median']:.2f}", gib(s["peak_anon_max"]), " | ".join(s["loads"])])
    return summary, rows


def print_table(title: str, rows: Sequence[Sequence], header: Sequence[str]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    sys.stdout.flush()


def write_json(path: str | os.PathLike | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1, default=str) + "\n")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="Small shapes, one repeat: a smoke test for CI (checks it runs, not its speed).")
    parser.add_argument("--repeats", type=int, default=None, help="Timed runs per contestant (default 3; 1 with --quick).")
    parser.add_argument("--json", default=None, help="Write every figure here as JSON.")
    parser.add_argument("--workdir", default=None, help="Scratch directory (default: a fresh one under /tmp, removed at the end).")
    parser.add_argument("--keep", action="store_true", help="Keep the scratch directory (and its synthetic checkpoints) for a rerun.")
    return parser


class Workdir:
    """Scratch space: a fresh temp dir removed at exit, or a given one kept for reuse."""

    def __init__(self, path: str | None, keep: bool, prefix: str):
        import tempfile

        if path:
            self.path = Path(path)
            self.path.mkdir(parents=True, exist_ok=True)
            self.remove = False
        else:
            self.path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
            self.remove = not keep

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        if self.remove:
            shutil.rmtree(self.path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Peers in their own virtual environments


def peer_python(env_var: str, default: str, module: str) -> tuple[str | None, str]:
    """(python executable, note): the peer venv's python if it exists and imports `module`."""
    root = os.environ.get(env_var, default)
    python = Path(root) / "bin" / "python"
    if not python.is_file():
        return None, f"skipped: no virtual environment at {root} (set ${env_var}; see benchmarks/README.md)"
    probe = subprocess.run([str(python), "-c", f"import {module}, importlib.metadata as m; print(m.version('{module}'))"], capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"skipped: {python} cannot import {module}"
    return str(python), f"{module} {probe.stdout.strip()} in {root}"


def rlvrx_cli() -> list[str]:
    """The rlvrx command as a user runs it (the console script beside this python, else -m)."""
    script = Path(sys.executable).parent / "rlvrx"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "rlvrx"]


# ----------------------------------------------------------------------------------------------
# Synthetic checkpoints of a real model's shape


QWEN25_05B = dict(layers=24, hidden=896, intermediate=4864, heads=14, kv_heads=2, vocab=151936)
QUICK_SHAPE = dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512)


def qwen2_tensors(shape: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a Qwen2 decoder with tied embeddings, in save_pretrained's order."""
    h, i, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    kv = shape["kv_heads"] * (h // shape["heads"])
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape["layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "self_attn.q_proj.bias", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)),
        ]
    out.append(("model.norm.weight", (h,)))
    return out


def qwen2_config(shape: dict) -> dict:
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        bos_token_id=min(151643, shape["vocab"] - 1),
        eos_token_id=min(151643, shape["vocab"] - 1),
    )
    data = config.to_dict()
    data["architectures"] = ["Qwen2ForCausalLM"]
    data["torch_dtype"] = "bfloat16"
    data["dtype"] = "bfloat16"
    return data


def write_trajectory(root: Path, steps: Sequence[int], shape: dict, seed: int = 0, drift: float = 2e-3, noise: float = 1e-3) -> list[Path]:
    """bf16 checkpoints root/step_NNNNNN: W_k = W_0 + (k-th step index) * D + noise_k, per tensor.

    W_0 ~ N(0, 0.02) (norm weights ~ 1 + N(0, 0.02)), D ~ N(0, drift) per parameter, noise ~ N(0, noise)
    fresh per checkpoint; so most parameters move linearly with R² well below 1. Reuses complete
    checkpoints from an earlier call with the same arguments (marker file).
    """
    import torch

    from rlvrx.io.writer import ShardedWriter

    root = Path(root)
    key = json.dumps({"steps": list(steps), "shape": shape, "seed": seed, "drift": drift, "noise": noise}, sort_keys=True)
    dirs = [root / f"step_{s:06d}" for s in steps]
    marker = root / "complete.json"
    if marker.is_file() and marker.read_text() == key and all(d.is_dir() for d in dirs):
        return dirs
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    tensors = qwen2_tensors(shape)
    specs = [(name, shp, torch.bfloat16) for name, shp in tensors]
    config = json.dumps(qwen2_config(shape), indent=2) + "\n"
    writers = []
    for d in dirs:
        d.mkdir()
        (d / "config.json").write_text(config)
        writers.append(ShardedWriter(d, specs, max_shard_bytes=5 * 10**9))
    gen = torch.Generator().manual_seed(seed)
    rows_per_chunk = 1 << 14
    for name, shp in tensors:
        outs = [torch.empty(shp, dtype=torch.bfloat16) for _ in dirs]
        rows = shp[0]
        for start in range(0, rows, rows_per_chunk):
            stop = min(rows, start + rows_per_chunk)
            part = (stop - start,) + tuple(shp[1:])
            base = torch.randn(part, generator=gen) * 0.02
            if "norm" in name:
                base += 1.0
            slope = torch.randn(part, generator=gen) * drift
            for k, out in enumerate(outs):
                value = base + k * slope
                value += torch.randn(part, generator=gen) * noise
                out[start:stop] = value.to(torch.bfloat16)
        for writer, out in zip(writers, outs):
            writer.write(name, out)
        del outs
    for writer in writers:
        writer.finish()
    marker.write_text(key)
    return dirs


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _bits(t):
    """The tensor's raw bits as integers (equal bits = identical values, NaN payloads included)."""
    import torch

    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(-1).view(ints[t.element_size()])


def compare_checkpoints(a: Path, b: Path, skip: Callable[[str], bool] = lambda n: False) -> dict:
    """Bitwise comparison of the tensors two checkpoint dirs share (by name)."""
    import torch

    from rlvrx.io.reader import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    names_a, names_b = set(ca.names()), set(cb.names())
    compared = identical = 0
    differing: list[str] = []
    max_ulps = 0
    for name in sorted(names_a & names_b):
        if skip(name):
            continue
        ta, tb = ca.get(name), cb.get(name)
        compared += 1
        same_kind = ta.dtype == tb.dtype and ta.shape == tb.shape
        if same_kind and torch.equal(_bits(ta), _bits(tb)):
            identical += 1
            continue
        differing.append(name)
        if same_kind and ta.element_size() == 2:
            max_ulps = max(max_ulps, int((_bits(ta).to(torch.int32) - _bits(tb).to(torch.int32)).abs().max()))
    ca.close()
    cb.close()
    return {
        "compared": compared,
        "identical": identical,
        "n_differing": len(differing),
        "differing": differing[:10],
        "only_in_a": sorted(names_a - names_b)[:10],
        "only_in_b": sorted(names_b - names_a)[:10],
        "max_ulps_16bit": max_ulps,
    }
