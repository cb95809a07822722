"""Weight extrapolation of two Qwen2.5-0.5B-shaped bf16 checkpoints: rlvrx vs mergekit vs the naive way.

Contestants, each a child process, run round-robin so that load changes hit all of them alike:
  rlvrx          `rlvrx extrapolate weights --base-path A --second-path B --alpha 3` (the default:
                 a fingerprint of each input in the provenance file: sizes, headers, sampled blocks)
  rlvrx-hash     the same with --hash (full sha256 of both inputs, on a background thread)
  mergekit       mergekit-yaml task_arithmetic, base = A, weight 3 on B, dtype float32 ->
                 out_dtype bfloat16, --lazy-unpickle --no-copy-tokenizer (its own venv)
  naive          both models through from_pretrained in float32, state-dict arithmetic,
                 bf16 save_pretrained
  io-floor       cat both inputs to /dev/null, cp one output-sized file
Warm runs (inputs in the page cache) and cold runs (page cache dropped first) are reported apart.
Outputs are compared bit for bit: rlvrx --all vs mergekit on every tensor, rlvrx (norm weights
copied from B by design) vs mergekit on the extrapolated tensors, naive vs mergekit.

    python benchmarks/extrapolate_weights.py [--quick] [--repeats 3] [--no-cold] [--json out.json]
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

ALPHA = 3.0
STEPS = (100, 200)

NAIVE = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForCausalLM
    base_path, second_path, out, alpha = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    second = AutoModelForCausalLM.from_pretrained(second_path, dtype=torch.float32)
    sd_base, sd_second = base.state_dict(), second.state_dict()
    seen = set()
    with torch.no_grad():
        for name, tensor in sd_base.items():
            if tensor.data_ptr() in seen:  # tied lm_head / embed_tokens: one tensor, update it once
                continue
            seen.add(tensor.data_ptr())
            tensor.add_(sd_second[name] - tensor, alpha=alpha)  # W_base + alpha (W_second - W_base)
    del second, sd_second
    base.to(torch.bfloat16).save_pretrained(out)
    print(json.dumps({"seconds": time.perf_counter() - t0}))
    """
)


def mergekit_config(base: Path, second: Path, alpha: float) -> str:
    return textwrap.dedent(
        f"""\
        merge_method: task_arithmetic
        base_model: {base}
        models:
          - model: {second}
            parameters:
              weight: {alpha}
        dtype: float32
        out_dtype: bfloat16
        """
    )


def main() -> None:
    parser = h.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-cold", action="store_true", help="Skip the cold-cache runs.")
    parser.add_argument("--mergekit-venv", default=None, help="Virtual environment with mergekit (default $RLVRX_BENCH_MERGEKIT_VENV or /work/.venv-mergekit).")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    cold_ok = not args.quick and not args.no_cold
    if args.mergekit_venv:
        import os

        os.environ["RLVRX_BENCH_MERGEKIT_VENV"] = args.mergekit_venv
    info = h.machine_info()
    shape = h.QUICK_SHAPE if args.quick else h.QWEN25_05B
    with h.Workdir(args.workdir, args.keep, "rlvrx-bench-extrap-") as work:
        print(f"synthetic checkpoints ({'quick shape' if args.quick else 'Qwen2.5-0.5B shape'}, bf16) under {work} ...", flush=True)
        base, second = h.write_trajectory(work / "ckpts", STEPS, shape)
        in_bytes = h.dir_bytes(base) + h.dir_bytes(second)
        outs = work / "outs"
        outs.mkdir(exist_ok=True)

        contestants: dict[str, callable] = {}
        notes: dict[str, str] = {}
        cli = h.rlvrx_cli()

        def rlvrx_cmd(out: Path, *extra: str) -> list[str]:
            return [
                *cli,
                "extrapolate",
                "weights",
                "--base-path",
                base,
                "--second-path",
                second,
                "--alpha",
                ALPHA,
                "--out",
                out,
                "--json",
                out.with_suffix(".json"),
                *extra,
            ]

        contestants["rlvrx"] = lambda out: rlvrx_cmd(out)
        if not args.quick:
            contestants["rlvrx-hash"] = lambda out: rlvrx_cmd(out, "--hash")
        mk_python, notes["mergekit"] = h.peer_python("RLVRX_BENCH_MERGEKIT_VENV", "/work/.venv-mergekit", "mergekit")
        if mk_python:
            config = work / "mergekit.yml"
            config.write_text(mergekit_config(base, second, ALPHA))
            mk_cli = Path(mk_python).parent / "mergekit-yaml"
            contestants["mergekit"] = lambda out: [mk_cli, config, out, "--lazy-unpickle", "--no-copy-tokenizer"]
        else:
            print(f"mergekit: {notes['mergekit']}", flush=True)
        naive_script = work / "naive.py"
        naive_script.write_text(NAIVE)
        contestants["naive"] = lambda out: [sys.executable, naive_script, base, second, out, ALPHA]
        floor_src = base / "model.safetensors"
        contestants["io-floor"] = lambda out: [
            "sh",
            "-c",
            f'cat "{base}"/*.safetensors "{second}"/*.safetensors > /dev/null && mkdir -p "{out}" && cp "{floor_src}" "{out}/"',
        ]

        runs: list[h.Run] = []
        modes = [False] + ([True] if cold_ok else [])
        cold_dropped = True
        for cold in modes:
            # one untimed warm-up round fills the page cache and the import caches
            rounds = ([-1] if not cold and not args.quick else []) + list(range(repeats))
            for r in rounds:
                for name, make in contestants.items():
                    out = outs / name
                    shutil.rmtree(out, ignore_errors=True)
                    out.with_suffix(".json").unlink(missing_ok=True)
                    if cold:
                        cold_dropped = h.drop_caches() and cold_dropped
                        if not cold_dropped:
                            h.evict_files([base, second])
                    run = h.check_ok(h.run_child(name, make(out), cold=cold))
                    if name.startswith("rlvrx"):
                        import json

                        run.inner = json.loads(out.with_suffix(".json").read_text())
                    h.print_run("cold" if cold else ("warm-up" if r < 0 else "warm"), name, run)
                    if r >= 0:
                        runs.append(run)

        # correctness: bit identity with mergekit (and naive)
        checks = {}
        all_out = outs / "rlvrx-all"
        shutil.rmtree(all_out, ignore_errors=True)
        h.check_ok(h.run_child("rlvrx --all", rlvrx_cmd(all_out, "--all", "--no-hash")))
        if "mergekit" in contestants:
            checks["rlvrx --all vs mergekit (every tensor)"] = h.compare_checkpoints(all_out, outs / "mergekit")
            checks["rlvrx vs mergekit (extrapolated tensors; norms are copied by design)"] = h.compare_checkpoints(
                outs / "rlvrx", outs / "mergekit", skip=lambda n: "norm" in n
            )
            checks["naive vs mergekit (every tensor)"] = h.compare_checkpoints(outs / "naive", outs / "mergekit")
        else:
            checks["rlvrx --all vs naive (every tensor)"] = h.compare_checkpoints(all_out, outs / "naive")

        results: dict = {
            "machine": info,
            "shape": shape,
            "alpha": ALPHA,
            "input_bytes": in_bytes,
            "notes": notes,
            "cold_cache_drop": "drop_caches" if cold_dropped else "posix_fadvise",
        }
        results["modes"], rows = h.summarize_cache_modes(runs, contestants, modes)
        for cold in modes:
            for name, block in results["modes"]["cold" if cold else "warm"].items():
                if name.startswith("rlvrx"):
                    block["inner_seconds"] = [round(r.inner.get("seconds", float("nan")), 3) for r in runs if r.contestant == name and r.cold == cold]
        results["checks"] = checks
        results["loadavg_end"] = h.loadavg()
        h.print_table(f"weight extrapolation, alpha {ALPHA:g}, {in_bytes / 1e9:.2f} GB of inputs, median of {repeats}", rows, h.CACHE_TABLE_HEADER)
        for what, check in checks.items():
            print(
                f"{what}: {check['identical']}/{check['compared']} tensors bit-identical"
                + (f"; differing: {check['differing'][:3]} (max {check['max_ulps_16bit']} ulp)" if check["n_differing"] else "")
            )

        ratios = {}
        for label, block in results["modes"].items():
            ours = block["rlvrx"]["median"]
            for peer in ("mergekit", "naive"):
                if peer in block:
                    ratios[f"{label}:vs_{peer}"] = block[peer]["median"] / ours
                    ratios[f"{label}-cpu:vs_{peer}"] = block[peer]["cpu_median"] / block["rlvrx"]["cpu_median"]
            ratios[f"{label}:over_io_floor"] = ours / block["io-floor"]["median"]
            if "naive" in block:
                ratios[f"{label}:anon_naive_over_rlvrx"] = block["naive"]["peak_anon_max"] / max(1, block["rlvrx"]["peak_anon_max"])
        results["ratios"] = ratios
        h.write_json(args.json, results)
        print("RATIO " + " ".join(f"{k}={v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
