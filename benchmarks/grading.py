"""Grading 64 samples x 500 MATH-500 answers: the rlvrx grading pool vs single-process math-verify.

Samples (deterministic, built from ../shared/data/benchmarks/math500.jsonl): for each problem, 64
completions cycling through 8 kinds, each repeated with 8 different partner problems:
the gold answer boxed; a sentence ending in the boxed gold; the problem's own solution text; a
partner problem's solution (wrong, long); a partner's boxed answer (wrong); the gold perturbed
(numbers +1, else "+1" appended); the gold in $...$ without a box; the first half of the own
solution (usually no final answer).

  pool     rlvrx.verify.pool.GradingPool() (default workers = min(4, CPUs); hard per-item timeout
           10 s) grading all items; timed from pool creation (worker start-up included) to the
           last verdict
  single   one process: math_verify.parse("\\boxed{gold}") (cached per problem), parse(completion),
           verify(gold, answer) with math-verify's default timeouts; timed from `import math_verify`
Both are child processes, run alternately. Verdicts are compared item by item: an item "lost to a
timeout" is one the pool marked timeout that the single process graded.

    python benchmarks/grading.py [--quick] [--repeats 2] [--samples 64] [--problems 500]
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

SINGLE = textwrap.dedent(
    """
    import json, sys, time
    items = json.load(open(sys.argv[1]))
    t0 = time.perf_counter()
    import logging
    import math_verify
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    golds = {}
    verdicts, errors, slow = [], 0, 0
    for completion, gold in items:
        if gold not in golds:
            golds[gold] = math_verify.parse("\\\\boxed{" + gold + "}")
        t = time.perf_counter()
        try:
            verdicts.append(bool(math_verify.verify(golds[gold], math_verify.parse(completion))))
        except Exception:
            verdicts.append(None)
            errors += 1
        slow += time.perf_counter() - t > 4.5
    print(json.dumps({"seconds": time.perf_counter() - t0, "verdicts": verdicts, "errors": errors, "near_timeout": slow}))
    """
)

POOL = textwrap.dedent(
    """
    import json, sys, time
    from rlvrx.verify.pool import GradingPool
    items = json.load(open(sys.argv[1]))
    t0 = time.perf_counter()
    with GradingPool() as pool:
        workers = pool.workers
        results = pool.grade([(c, g, "math") for c, g in items])
        restarts = pool.restarts
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "workers": workers, "restarts": restarts,
                      "verdicts": [r.correct for r in results], "status": [r.status for r in results]}))
    """
)


def perturb(gold: str) -> str:
    numbers = list(re.finditer(r"\d+", gold))
    if numbers:
        m = numbers[-1]
        return gold[: m.start()] + str(int(m.group()) + 1) + gold[m.end() :]
    return gold + "+1"


def build_items(rows: list[dict], samples: int) -> list[tuple[str, str]]:
    n = len(rows)
    items = []
    for i, row in enumerate(rows):
        gold, solution = row["answer"], row["solution"]
        for j in range(samples):
            partner = rows[(i + 1 + j // 8) % n]
            kind = j % 8
            completion = [
                f"\\boxed{{{gold}}}",
                f"Let's compute step by step. So the final answer is $\\boxed{{{gold}}}$.",
                solution,
                partner["solution"],
                f"The answer is \\boxed{{{partner['answer']}}}.",
                f"The answer is \\boxed{{{perturb(gold)}}}.",
                f"Therefore the answer is ${gold}$.",
                solution[: len(solution) // 2],
            ][kind]
            items.append((completion, gold))
    return items


def main() -> None:
    parser = h.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=None, help="Samples per problem (default 64; 4 with --quick).")
    parser.add_argument("--problems", type=int, default=None, help="MATH-500 problems (default 500; 20 with --quick).")
    parser.add_argument("--data", default=str(h.DATA_DIR / "math500.jsonl"), help="MATH-500 JSONL ({problem, answer, solution}).")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)
    samples = args.samples or (4 if args.quick else 64)
    problems = args.problems or (20 if args.quick else 500)
    data = Path(args.data)
    if not data.is_file():
        raise SystemExit(f"{data}: no MATH-500 file (pass --data PATH)")
    rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()][:problems]
    items = build_items(rows, samples)
    info = h.machine_info()
    with h.Workdir(args.workdir, args.keep, "rlvrx-bench-grade-") as work:
        items_file = work / "items.json"
        items_file.write_text(json.dumps(items))
        (work / "single.py").write_text(SINGLE)
        (work / "pool.py").write_text(POOL)
        contestants = {"pool": [sys.executable, work / "pool.py", items_file], "single": [sys.executable, work / "single.py", items_file]}
        runs: list[h.Run] = []
        for _ in range(repeats):
            for name, cmd in contestants.items():
                run = h.check_ok(h.run_child(name, cmd))
                print(
                    f"  {name:6s} {run.inner['seconds']:8.2f} s  ({len(items) / run.inner['seconds']:6.1f} items/s)  process {run.wall_s:7.2f} s  "
                    f"cpu {run.cpu_s:7.2f} s  load {run.load}",
                    flush=True,
                )
                runs.append(run)

        results: dict = {"machine": info, "items": len(items), "samples": samples, "problems": problems, "contestants": {}}
        rows_out = []
        for name in contestants:
            sel = [r for r in runs if r.contestant == name]
            s = h.summarize_runs(sel, key=lambda r: r.inner["seconds"])
            results["contestants"][name] = s
            rows_out.append(
                [
                    name,
                    f"{s['median']:.2f}",
                    h.spread(s["values"]),
                    f"{len(items) / s['median']:.1f}",
                    f"{s['cpu_median']:.1f}",
                    h.mib(s["peak_anon_max"]),
                    " | ".join(s["loads"]),
                ]
            )
        h.print_table(
            f"grading {samples} samples x {problems} MATH-500 answers = {len(items)} items, median of {repeats}",
            rows_out,
            ["grader", "median s", "range s", "items/s", "cpu s (tree)", "peak anon", "load avg at start of each run"],
        )

        # verdicts, item by item (last run of each)
        pool_run = [r for r in runs if r.contestant == "pool"][-1].inner
        single_run = [r for r in runs if r.contestant == "single"][-1].inner
        lost = sum(1 for st, v in zip(pool_run["status"], single_run["verdicts"]) if st == "timeout" and v is not None)
        disagree = sum(1 for p, v in zip(pool_run["verdicts"], single_run["verdicts"]) if v is not None and p != v)
        checks = {
            "pool_timeouts": pool_run["status"].count("timeout"),
            "pool_errors": pool_run["status"].count("error"),
            "pool_restarts": pool_run["restarts"],
            "pool_workers": pool_run["workers"],
            "single_errors": single_run["errors"],
            "single_near_timeout": single_run["near_timeout"],
            "lost_to_timeout": lost,
            "verdict_disagreements": disagree,
            "correct_pool": sum(bool(v) for v in pool_run["verdicts"]),
            "correct_single": sum(bool(v) for v in single_run["verdicts"]),
        }
        results["checks"] = checks
        print(
            f"pool: {checks['pool_workers']} workers, {checks['pool_timeouts']} timeouts, {checks['pool_errors']} errors, {checks['pool_restarts']} restarts; "
            f"lost to a timeout that the single process graded: {lost}; verdicts that differ: {disagree}; "
            f"correct: pool {checks['correct_pool']}, single {checks['correct_single']} of {len(items)}"
        )
        ratio = results["contestants"]["single"]["median"] / results["contestants"]["pool"]["median"]
        results["ratios"] = {"pool_speedup": ratio}
        results["loadavg_end"] = h.loadavg()
        h.write_json(args.json, results)
        print(f"RATIO pool_speedup={ratio:.2f}x lost_to_timeout={lost} disagreements={disagree}")


if __name__ == "__main__":
    main()
