"""Logits extrapolation sampling, 64 prompts x k = 8: the batched two-model sampler vs its baselines.

Contestants, each in its own child process (models built there; only generation is timed):
  batched      rlvrx.generation.generate(ExtrapolatedSource(base, second, alpha), prompts, n=8):
               all 64 x 8 rows decoded together, both models in lockstep, finished rows dropped
  per-prompt   the reference implementation's structure: one prompt at a time with its k = 8 rows
               (the same sampler and source, called 64 times)
  single       one model sampling the same 64 x 8 batch (the floor: extrapolation runs two forwards)
Models: "tiny" (the quickstart's 2-layer, hidden-64 model, character vocabulary) and "small"
(4 layers, hidden 256, vocabulary 32768), float32 on CPU, random weights with the tied embeddings
scaled x3.5 so that the top-p nucleus ranges from 1 token to a few thousand (an unscaled random
model is nearly uniform) and a "second checkpoint" one step of N(0, 0.002) noise away; alpha 2.
Prompts are random token ids of 16-40 tokens; temperature 0.6, top-p 0.95; every row decodes
max_new_tokens (64 tiny, 16 small; no stop token), so all contestants do the same number of token
steps.

    python benchmarks/logits_extrapolation.py [--quick] [--repeats 3] [--sizes tiny,small]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

SIZES = {
    "tiny": dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=256, max_position=128, vocab=None, new_tokens=64, embed_scale=3.5),
    "small": dict(layers=4, hidden=256, heads=4, kv_heads=2, intermediate=1024, max_position=256, vocab=32768, new_tokens=16, embed_scale=3.5),
}
QUICK = {"prompts": 8, "k": 4, "new_tokens": 8}
ALPHA = 2.0
CONTESTANTS = ("batched", "per-prompt", "single")


def build_models(size: dict):
    """(base, second, vocab): a random model with its tied embeddings scaled by embed_scale so that
    the top-p nucleus ranges from one token to a few thousand, as a trained model's does (an
    unscaled random model is nearly uniform), and a nearby "later checkpoint" (every weight moved
    by N(0, 0.002))."""
    import copy

    import torch

    from rlvrx.tiny import build_tiny_model, tiny_config

    arch = {k: size[k] for k in ("layers", "hidden", "heads", "kv_heads", "intermediate", "max_position")}
    if size["vocab"] is None:
        base, tok = build_tiny_model(**arch, seed=0)
        vocab = len(tok)
    else:
        from transformers import Qwen2ForCausalLM

        torch.manual_seed(0)
        base = Qwen2ForCausalLM(tiny_config(size["vocab"], **arch))
        vocab = size["vocab"]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        base.get_input_embeddings().weight.mul_(size["embed_scale"])
        second = copy.deepcopy(base)
        for param in second.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.002)
    return base.eval(), second.eval(), vocab


def child(contestant: str, size_name: str, n_prompts: int, k: int, new_tokens: int, repeats: int) -> None:
    import numpy as np
    import torch

    from rlvrx.generation import ExtrapolatedSource, SamplingParams, generate

    size = SIZES[size_name]
    base, second, vocab = build_models(size)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, vocab, size=int(rng.integers(16, 41))).tolist() for _ in range(n_prompts)]

    def run_once(subset=prompts, tokens=new_tokens):
        p = SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=tokens, seed=0, stop_token_ids=())
        if contestant == "batched":
            return generate(ExtrapolatedSource(base, second, ALPHA), None, subset, n=k, params=p)
        if contestant == "single":
            return generate(base, None, subset, n=k, params=p)
        out = []
        for prompt in subset:
            out += generate(ExtrapolatedSource(base, second, ALPHA), None, [prompt], n=k, params=p)
        return out

    run_once(prompts[:2], 2)  # warm-up: kernels, allocator
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        gens = run_once()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    tokens = sum(len(g.token_ids) for g in gens)
    print(
        json.dumps({"times": times, "cpu": cpu, "tokens": tokens, "rows": len(gens), "threads": torch.get_num_threads(), "first_tokens": gens[0].token_ids[:8]})
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        contestant, size, n_prompts, k, new_tokens, repeats = sys.argv[2:8]
        child(contestant, size, int(n_prompts), int(k), int(new_tokens), int(repeats))
        return
    parser = h.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,small", help="Comma-separated model sizes: tiny, small.")
    parser.add_argument("--inner-repeats", type=int, default=1, help="Timed generations inside each child.")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    sizes = ["tiny"] if args.quick else [s.strip() for s in args.sizes.split(",") if s.strip()]
    info = h.machine_info()
    results: dict = {"machine": info, "alpha": ALPHA, "sizes": {}}
    rows = []
    ratios = {}
    for size in sizes:
        n_prompts = QUICK["prompts"] if args.quick else 64
        k = QUICK["k"] if args.quick else 8
        new_tokens = QUICK["new_tokens"] if args.quick else SIZES[size]["new_tokens"]
        runs: list[h.Run] = []
        for _ in range(repeats):
            for contestant in CONTESTANTS:
                cmd = [sys.executable, Path(__file__).resolve(), "--child", contestant, size, n_prompts, k, new_tokens, args.inner_repeats]
                run = h.check_ok(h.run_child(contestant, cmd))
                gen_s = min(run.inner["times"])
                print(
                    f"  {size:5s} {contestant:10s} generate {gen_s:7.2f} s  ({run.inner['tokens'] / gen_s:8.0f} tokens/s)  process {run.wall_s:6.2f} s  load {run.load}",
                    flush=True,
                )
                runs.append(run)
        block = {}
        for contestant in CONTESTANTS:
            sel = [r for r in runs if r.contestant == contestant]
            s = h.summarize_runs(sel, key=lambda r: min(r.inner["times"]))
            s["tokens"] = sel[0].inner["tokens"]
            s["gen_cpu_median"] = h.median([min(r.inner["cpu"]) for r in sel])
            s["tokens_per_s"] = s["tokens"] / s["median"]
            block[contestant] = s
            rows.append(
                [
                    size,
                    contestant,
                    f"{s['median']:.2f}",
                    h.spread(s["values"]),
                    f"{s['gen_cpu_median']:.2f}",
                    f"{s['tokens_per_s']:.0f}",
                    f"{n_prompts / s['median']:.2f}",
                    " | ".join(s["loads"]),
                ]
            )
        results["sizes"][size] = {"prompts": n_prompts, "k": k, "new_tokens": new_tokens, **block}
        ratios[f"{size}:batched_over_per_prompt_throughput"] = block["per-prompt"]["median"] / block["batched"]["median"]
        ratios[f"{size}:batched_time_over_single"] = block["batched"]["median"] / block["single"]["median"]
        ratios[f"{size}-cpu:batched_over_per_prompt"] = block["per-prompt"]["gen_cpu_median"] / block["batched"]["gen_cpu_median"]
    results["ratios"] = ratios
    results["loadavg_end"] = h.loadavg()
    h.print_table(
        f"logits extrapolation sampling, k = {k}, median of {repeats} (generation only)",
        rows,
        ["model", "contestant", "median s", "range s", "cpu s", "tokens/s", "prompts/s", "load avg at start of each run"],
    )
    h.write_json(args.json, results)
    print("RATIO " + " ".join(f"{key}={value:.2f}x" for key, value in ratios.items()))


if __name__ == "__main__":
    main()
