"""Temporal rank-1 extrapolation (RELEX) of 8 Qwen2.5-0.5B-shaped bf16 checkpoints: rlvrx vs RELEX's own scripts.

Checkpoints at steps 0..7 (base 0, window 1..7: W_k = W_0 + k D + noise_k), predicted at step 20.
Contestants, each a child process, run round-robin:
  rlvrx      `rlvrx extrapolate weights RUN --fit rank1 --base 0 --window 1:7 --target 20 --all`
             (--all: RELEX extrapolates norm weights too)
  relex      RELEX's scripts/precompute_deltas.py then scripts/svd_extrapolation.py --rank 1
             --fit_method linear --mode extrapolate --history_steps 7 --target_steps 20, from the
             checkout given by --relex-dir (skipped with a message when absent; its code is run,
             never copied); python from --relex-python (default: this one; needs scipy and tqdm)
  io-floor   cat every input to /dev/null, cp one output-sized file
Agreement: rlvrx against RELEX's output (bf16 ulps, and ||rlvrx - relex|| / ||rlvrx - W_7|| over every
tensor; RELEX stores its deltas in float16 and fits on the index, which equals the step here), and
against an in-process numpy reference (np.linalg.svd of M in float64, per tensor, every tensor up to
--ref-max-numel elements).

    python benchmarks/rank1_extrapolation.py [--quick] [--repeats 3] [--relex-dir DIR] [--json out.json]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

STEPS = tuple(range(8))
TARGET = 20


def numpy_reference(ckpts: list[Path], out: Path, max_numel: int) -> dict:
    """Every tensor up to max_numel elements: the issue's recipe with np.linalg.svd in float64,
    rounded to bf16, against rlvrx's output (ulps) -- an independent check of the arithmetic."""
    import numpy as np
    import torch

    from rlvrx.io.reader import Checkpoint

    opened = [Checkpoint(p) for p in ckpts]
    result = Checkpoint(out)
    compared = identical = 0
    max_ulps = 0
    steps = np.array(STEPS[1:], dtype=np.float64)
    for name, info in opened[0].infos().items():
        if info.numel > max_numel:
            continue
        base = opened[0].get(name).double().numpy().ravel()
        m = np.stack([c.get(name).double().numpy().ravel() - base for c in opened[1:]])
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        b, a = np.polyfit(steps, s[0] * u[:, 0], 1)
        want = torch.from_numpy(base + (a + b * TARGET) * vt[0]).to(torch.bfloat16)
        got = result.get(name).reshape(-1)
        ulps = int((want.view(torch.int16).to(torch.int32) - got.view(torch.int16).to(torch.int32)).abs().max())
        compared += 1
        identical += ulps == 0
        max_ulps = max(max_ulps, ulps)
    for c in [*opened, result]:
        c.close()
    return {"compared": compared, "identical": identical, "max_ulps_16bit": max_ulps}


def relative_gap(a: Path, b: Path, ref: Path) -> float:
    """||a - b|| / ||a - ref|| over the tensors all three share (float64)."""
    import math

    from rlvrx.io.reader import Checkpoint

    num = den = 0.0
    with Checkpoint(a) as ca, Checkpoint(b) as cb, Checkpoint(ref) as cr:
        for name in sorted(set(ca.names()) & set(cb.names())):
            x = ca.get(name).double()
            num += float((x - cb.get(name).double()).square().sum())
            den += float((x - cr.get(name).double()).square().sum())
    return math.sqrt(num / den) if den > 0 else math.nan


def main() -> None:
    parser = h.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--relex-dir", default=os.environ.get("RLVRX_BENCH_RELEX_DIR"), help="A checkout of weizhepei/RELEX ($RLVRX_BENCH_RELEX_DIR).")
    parser.add_argument("--relex-python", default=sys.executable, help="Python that runs RELEX's scripts (needs torch, transformers, scipy, tqdm).")
    parser.add_argument("--ref-max-numel", type=int, default=None, help="Largest tensor the numpy reference checks (default: all with --quick, 16M otherwise).")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    shape = h.QUICK_SHAPE if args.quick else h.QWEN25_05B
    ref_max = args.ref_max_numel or (1 << 62 if args.quick else 1 << 24)
    info = h.machine_info()
    with h.Workdir(args.workdir, args.keep, "rlvrx-bench-rank1-") as work:
        print(
            f"synthetic checkpoints ({'quick shape' if args.quick else 'Qwen2.5-0.5B shape'}, bf16, steps {STEPS[0]}..{STEPS[-1]}) under {work} ...", flush=True
        )
        ckpts = h.write_trajectory(work / "ckpts", STEPS, shape)
        in_bytes = sum(h.dir_bytes(c) for c in ckpts)
        from rlvrx.trajectory import Trajectory

        run = work / "run"
        shutil.rmtree(run, ignore_errors=True)
        traj = Trajectory.load(run, create=True)
        for step, path in zip(STEPS, ckpts):
            traj.add(step, path, kind="base" if step == 0 else "rl", hash=False)
        traj.save()
        outs = work / "outs"
        outs.mkdir(exist_ok=True)
        cli = h.rlvrx_cli()
        contestants = {
            "rlvrx": lambda out: [
                *cli,
                "extrapolate",
                "weights",
                run,
                "--fit",
                "rank1",
                "--base",
                "0",
                "--window",
                "1:7",
                "--target",
                TARGET,
                "--all",
                "--out",
                out,
                "--json",
                out.with_suffix(".json"),
            ],
        }
        notes = {}
        relex_scripts = Path(args.relex_dir) / "scripts" if args.relex_dir else None
        if relex_scripts is None or not (relex_scripts / "svd_extrapolation.py").is_file():
            notes["relex"] = (
                f"skipped: no RELEX checkout ({'--relex-dir not given' if args.relex_dir is None else f'{relex_scripts} has no svd_extrapolation.py'})"
            )
            print(f"relex: {notes['relex']}", flush=True)
        else:
            layout = work / "relex-ckpts"  # RELEX finds checkpoints as global_step_N/
            shutil.rmtree(layout, ignore_errors=True)
            layout.mkdir()
            for step, path in zip(STEPS[1:], ckpts[1:]):
                (layout / f"global_step_{step}").symlink_to(path)
            notes["relex"] = f"{args.relex_dir} with {args.relex_python}"

            def relex_cmd(out: Path) -> list:
                deltas = out.parent / "relex-deltas"
                script = (
                    f'rm -rf "{deltas}" && "{args.relex_python}" "{relex_scripts}/precompute_deltas.py" --base_model "{ckpts[0]}" '
                    f'--checkpoint_dir "{layout}" --output_dir "{deltas}" --num_workers 1 && '
                    f'"{args.relex_python}" "{relex_scripts}/svd_extrapolation.py" --delta_dir "{deltas}" --base_model "{ckpts[0]}" '
                    f'--output_dir "{out}" --history_steps {STEPS[-1]} --rank 1 --fit_method linear --mode extrapolate '
                    f"--target_steps {TARGET} --target_step_scaling_factor 1.0 --num_workers 1"
                )
                return ["sh", "-c", script]

            contestants["relex"] = relex_cmd
        contestants["io-floor"] = lambda out: [
            "sh",
            "-c",
            " ".join(f'cat "{c}"/*.safetensors > /dev/null &&' for c in ckpts) + f' mkdir -p "{out}" && cp "{ckpts[0]}/model.safetensors" "{out}/"',
        ]

        runs: list[h.Run] = []
        for r in ([-1] if not args.quick else []) + list(range(repeats)):
            for name, make in contestants.items():
                out = outs / name
                shutil.rmtree(out, ignore_errors=True)
                out.with_suffix(".json").unlink(missing_ok=True)
                result = h.check_ok(h.run_child(name, make(out)))
                if name == "rlvrx":
                    result.inner = json.loads(out.with_suffix(".json").read_text())
                h.print_run("warm-up" if r < 0 else "warm", name, result)
                if r >= 0:
                    runs.append(result)

        checks = {"rlvrx vs numpy float64 SVD reference": numpy_reference(ckpts, outs / "rlvrx", ref_max)}
        if "relex" in contestants:
            relex_out = outs / "relex" / f"step{TARGET}"
            checks["rlvrx vs relex"] = {**h.compare_checkpoints(outs / "rlvrx", relex_out), "relative_gap": relative_gap(outs / "rlvrx", relex_out, ckpts[-1])}
        results: dict = {"machine": info, "shape": shape, "steps": list(STEPS), "target": TARGET, "input_bytes": in_bytes, "notes": notes}
        results["modes"], rows = h.summarize_cache_modes(runs, contestants, [False])
        block = results["modes"]["warm"]
        block["rlvrx"]["inner_seconds"] = [round(r.inner.get("seconds", float("nan")), 3) for r in runs if r.contestant == "rlvrx"]
        block["rlvrx"]["median_explained_variance"] = runs[-1].inner.get("median_explained_variance") if runs else None
        results["checks"] = checks
        results["loadavg_end"] = h.loadavg()
        h.print_table(
            f"rank-1 extrapolation to step {TARGET}, {len(STEPS)} checkpoints, {in_bytes / 1e9:.2f} GB of inputs, median of {repeats}",
            rows,
            h.CACHE_TABLE_HEADER,
        )
        for what, check in checks.items():
            line = f"{what}: {check['identical']}/{check['compared']} tensors bit-identical, max {check['max_ulps_16bit']} ulp"
            if "relative_gap" in check:
                line += f"; ||rlvrx - relex|| / ||rlvrx - W_{STEPS[-1]}|| = {check['relative_gap']:.3g}"
            print(line)
        ours = block["rlvrx"]
        ratios = {"over_io_floor": ours["median"] / block["io-floor"]["median"], "anon_over_one_input": ours["peak_anon_max"] / max(1, h.dir_bytes(ckpts[0]))}
        if "relex" in block:
            ratios["relex_over_rlvrx"] = block["relex"]["median"] / ours["median"]
            ratios["anon_relex_over_rlvrx"] = block["relex"]["peak_anon_max"] / max(1, ours["peak_anon_max"])
        results["ratios"] = ratios
        h.write_json(args.json, results)
        print("RATIO " + " ".join(f"{k}={v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
