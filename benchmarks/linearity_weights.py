"""Weight linearity over 8 Qwen2.5-0.5B-shaped bf16 checkpoints: rlvrx vs the reference structure.

Contestants, each a child process, run round-robin:
  rlvrx-full     `rlvrx linearity weights -c STEP=PATH ... --no-plots` (every parameter, streamed)
  rlvrx-sample   the same with --sample 0.001 (the paper's setting)
  reference      the reference implementation's structure: every checkpoint's state dict loaded
                 into memory (safetensors load_file, tensors copied out of the file mapping), then
                 per tensor a seeded 0.1% sample stacked over the K checkpoints and a float64
                 least-squares line (numpy lstsq, all sampled parameters of a tensor at once)
Warm runs (checkpoints in the page cache) and cold runs (page cache dropped first) are reported
apart. The medians of R² reported by the three are printed side by side as a sanity check.

    python benchmarks/linearity_weights.py [--quick] [--repeats 3] [--checkpoints 8] [--no-cold]
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

REFERENCE = textwrap.dedent(
    """
    import json, sys, time
    t0 = time.perf_counter()
    import numpy as np
    import torch
    from pathlib import Path
    from safetensors.torch import load_file

    steps = [int(s) for s in sys.argv[1].split(",")]
    paths = sys.argv[2:]
    fraction, min_per_tensor = 0.001, 50
    # all state dicts in memory (clone: really in memory, not pages of the file mapping)
    state_dicts = []
    for path in paths:
        sd = {}
        for file in sorted(Path(path).glob("*.safetensors")):
            sd.update({k: v.clone() for k, v in load_file(str(file)).items()})
        state_dicts.append(sd)
    t_loaded = time.perf_counter()
    t = np.asarray(steps, dtype=np.float64)
    design = np.stack([np.ones_like(t), t], axis=1)
    rng = np.random.default_rng(0)
    values = []
    for name, first in state_dicts[0].items():
        if not first.is_floating_point():
            continue
        n = first.numel()
        size = min(n, max(min_per_tensor, int(round(fraction * n))))
        idx = torch.from_numpy(np.sort(rng.choice(n, size=size, replace=False)))
        y = np.stack([sd[name].reshape(-1)[idx].double().numpy() for sd in state_dicts])  # [K, size]
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        ss_res = ((y - design @ coef) ** 2).sum(axis=0)
        ss_tot = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
        span = y.max(axis=0) - y.min(axis=0)
        keep = (ss_tot > 0) & (span >= 1e-4)
        values.append(1.0 - ss_res[keep] / ss_tot[keep])
    r2 = np.concatenate(values)
    print(json.dumps({
        "seconds": time.perf_counter() - t0, "load_seconds": t_loaded - t0, "n": int(r2.size),
        "median_r2": float(np.median(r2)), "frac_r2_gt_0_7": float((r2 > 0.7).mean()),
    }))
    """
)


def main() -> None:
    parser = h.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=None, help="How many checkpoints (default 8; 4 with --quick).")
    parser.add_argument("--no-cold", action="store_true", help="Skip the cold-cache runs.")
    parser.add_argument("--cold-repeats", type=int, default=None, help="Cold runs per contestant (default: --repeats, at most 2).")
    parser.add_argument("--memory-mb", type=int, default=None, help="Pass --memory-mb to rlvrx (default: its own default).")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    k = args.checkpoints or (4 if args.quick else 8)
    cold_ok = not args.quick and not args.no_cold
    info = h.machine_info()
    shape = h.QUICK_SHAPE if args.quick else h.QWEN25_05B
    steps = [100 * (i + 1) for i in range(k)]
    with h.Workdir(args.workdir, args.keep, "rlvrx-bench-lin-") as work:
        print(f"{k} synthetic checkpoints ({'quick shape' if args.quick else 'Qwen2.5-0.5B shape'}, bf16) under {work} ...", flush=True)
        dirs = h.write_trajectory(work / f"ckpts{k}", steps, shape)
        in_bytes = sum(h.dir_bytes(d) for d in dirs)
        outs = work / "outs"
        outs.mkdir(exist_ok=True)
        cli = h.rlvrx_cli()
        pairs = [f"{s}={d}" for s, d in zip(steps, dirs)]
        extra = ["--memory-mb", str(args.memory_mb)] if args.memory_mb else []

        def rlvrx_cmd(name: str, *more: str) -> list:
            cmd = [*cli, "linearity", "weights", "--no-plots", "--out", outs / name, "--json", outs / f"{name}.json", *extra, *more]
            for pair in pairs:
                cmd += ["-c", pair]
            return cmd

        ref_script = work / "reference.py"
        ref_script.write_text(REFERENCE)
        contestants = {
            "rlvrx-full": rlvrx_cmd("rlvrx-full"),
            "rlvrx-sample": rlvrx_cmd("rlvrx-sample", "--sample", "0.001"),
            "reference": [sys.executable, ref_script, ",".join(map(str, steps)), *dirs],
        }
        runs: list[h.Run] = []
        modes = [False] + ([True] if cold_ok else [])
        cold_dropped = True
        for cold in modes:
            # warm-up: the reference alone, which reads every file (fills the page cache)
            rounds = ([-1] if not cold and not args.quick else []) + list(range(repeats if not cold else (args.cold_repeats or min(2, repeats))))
            for r in rounds:
                for name, cmd in contestants.items():
                    if r < 0 and name != "reference":
                        continue
                    if cold:
                        cold_dropped = h.drop_caches() and cold_dropped
                        if not cold_dropped:
                            h.evict_files(dirs)
                    run = h.check_ok(h.run_child(name, cmd, cold=cold))
                    if name.startswith("rlvrx"):
                        run.inner = json.loads((outs / f"{name}.json").read_text())
                        run.inner.pop("tensors", None)
                    h.print_run("cold" if cold else ("warm-up" if r < 0 else "warm"), name, run)
                    if r >= 0:
                        runs.append(run)

        results: dict = {
            "machine": info,
            "shape": shape,
            "steps": steps,
            "input_bytes": in_bytes,
            "cold_cache_drop": "drop_caches" if cold_dropped else "posix_fadvise",
        }
        results["modes"], rows = h.summarize_cache_modes(runs, contestants, modes)
        last = {r.contestant: r.inner for r in runs}
        results["answers"] = {name: {key: last[name].get(key) for key in ("median_r2", "frac_r2_gt_0_7", "n_params", "n")} for name in contestants}
        results["loadavg_end"] = h.loadavg()
        h.print_table(f"weight linearity, {k} checkpoints, {in_bytes / 1e9:.2f} GB, median of the runs listed", rows, h.CACHE_TABLE_HEADER)
        for name, answer in results["answers"].items():
            print(f"  {name:13s} median R² {answer['median_r2']}, R² > 0.7: {answer['frac_r2_gt_0_7']}, over {answer['n_params'] or answer['n']} parameters")
        ratios = {}
        for label, block in results["modes"].items():
            ref = block["reference"]
            ratios[f"{label}:ref_over_full"] = ref["median"] / block["rlvrx-full"]["median"]
            ratios[f"{label}:ref_over_sample"] = ref["median"] / block["rlvrx-sample"]["median"]
            ratios[f"{label}:anon_ref_over_full"] = ref["peak_anon_max"] / max(1, block["rlvrx-full"]["peak_anon_max"])
        results["ratios"] = ratios
        h.write_json(args.json, results)
        print("RATIO " + " ".join(f"{key}={value:.2f}x" for key, value in ratios.items()))


if __name__ == "__main__":
    main()
