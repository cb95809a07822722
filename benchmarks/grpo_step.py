"""One GRPO step on the quickstart model and batch: the native rlvrx trainer vs TRL's GRPOTrainer, on CPU.

Both start from the same freshly built tiny model (recipes/quickstart.yaml: 2 layers, hidden 64,
character tokenizer) and the same 2-digit addition prompts, and do the same work per step:
128 prompts x num_generations 8 = 1024 completions of at most 4 new tokens at temperature 1, a
reward per completion, group-normalised advantages, one clipped policy-gradient update over all
1024 rows (beta 0, epsilon 0.2 / epsilon_high 0.28, token-mean loss = TRL's "dapo", lr 5e-5, AdamW,
grad-norm clip 1.0). Each contestant runs in its own child process (TRL in its own virtual
environment) for a few steps; the first step is a warm-up and is not counted. Step time = rollout
+ reward + update, as each trainer's own step.

  rlvrx   Trainer(recipe).setup(), then grpo_step() (rlvrx/train/trainer.py)
  hf-loop the plain way, always available: transformers `model.generate(num_return_sequences=8)`,
          the reward, then the same clipped loss and AdamW step written out in a few lines
  trl     trl.GRPOTrainer(model, reward_funcs=[leading-integer reward], GRPOConfig(...)).train(),
          step times from a TrainerCallback (on_step_begin .. on_step_end)

    python benchmarks/grpo_step.py [--quick] [--repeats 3] [--steps 4] [--trl-venv DIR]
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

RLVRX_CHILD = textwrap.dedent(
    """
    import json, sys, time
    from rlvrx.config import load_recipe
    from rlvrx.train.trainer import Trainer

    run_dir, steps, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    recipe = load_recipe("quickstart", overrides=[f"output.dir={run_dir}", *overrides])
    trainer = Trainer(recipe)
    trainer.setup()
    times, records = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        c0 = time.process_time()
        record = trainer.grpo_step()
        times.append(time.perf_counter() - t0)
        records.append({"cpu": time.process_time() - c0, "reward_mean": record["reward_mean"], "response_length": record["response_length"]})
    trainer.close()
    print(json.dumps({"step_times": times, "records": records}))
    """
)

TRL_CHILD = textwrap.dedent(
    """
    import json, re, sys, time
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model_dir, data_file, out_dir, steps, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    rows = [json.loads(line) for line in open(data_file)]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    leading = re.compile(r"(-?)([0-9]+)(\\.[0-9])?", re.ASCII)

    def extract(text):
        m = leading.match(text.lstrip())
        if m is None or m.group(3):
            return None
        digits = m.group(2).lstrip("0") or "0"
        return digits if digits == "0" or not m.group(1) else "-" + digits

    def reward(completions, answer, **kwargs):
        return [1.0 if extract(c) == str(int(a)) else 0.0 for c, a in zip(completions, answer)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.cpu = [], []
        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()
        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

    config = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=batch_size * 8, gradient_accumulation_steps=1,
        num_generations=8, max_completion_length=4, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=5e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        adam_beta1=0.9, adam_beta2=0.999, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        scale_rewards="group", num_iterations=1, max_steps=steps, use_cpu=True, bf16=False,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
        log_completions=False, disable_tqdm=True,
    )
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    rewards = [r.get("reward") for r in trainer.state.log_history if "reward" in r]
    lengths = [r.get("completions/mean_length") for r in trainer.state.log_history if "completions/mean_length" in r]
    print(json.dumps({"step_times": timer.times, "records": [{"cpu": c, "reward_mean": rw, "response_length": ln}
                                                             for c, rw, ln in zip(timer.cpu, rewards, lengths)]}))
    """
)


HF_LOOP_CHILD = textwrap.dedent(
    """
    import json, re, sys, time
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, data_file, steps, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    G = 8
    rows = [json.loads(line) for line in open(data_file)]
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0, betas=(0.9, 0.999))
    leading = re.compile(r"(-?)([0-9]+)(\\.[0-9])?", re.ASCII)

    def reward(text, answer):
        m = leading.match(text.lstrip())
        if m is None or m.group(3):
            return 0.0
        digits = m.group(2).lstrip("0") or "0"
        value = digits if digits == "0" or not m.group(1) else "-" + digits
        return 1.0 if value == str(int(answer)) else 0.0

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    times, records = [], []
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        batch = [rows[i] for i in rng.choice(len(rows), size=batch_size)]
        enc = tok([r["prompt"] for r in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        model.eval()
        with torch.no_grad():
            seqs = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=4,
                                  num_return_sequences=G, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        width = enc.input_ids.shape[1]
        completion = seqs[:, width:]
        eos = (completion == tok.eos_token_id).long()
        mask = ((eos.cumsum(1) - eos) == 0).float()  # tokens up to and including the first eos
        texts = tok.batch_decode(completion, skip_special_tokens=True)
        rewards = torch.tensor([reward(t, batch[i // G]["answer"]) for i, t in enumerate(texts)])
        grouped = rewards.view(-1, G)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1, 1)
        attention = torch.cat([enc.attention_mask.repeat_interleave(G, 0), mask.long()], dim=1)
        model.train()
        logits = model(input_ids=seqs, attention_mask=attention).logits[:, width - 1:-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(logp - logp.detach())
        per_token = -torch.min(ratio * adv, ratio.clamp(1 - 0.2, 1 + 0.28) * adv)
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t0)
        records.append({"cpu": time.process_time() - c0, "reward_mean": float(rewards.mean()), "response_length": float(mask.sum(1).mean())})
    print(json.dumps({"step_times": times, "records": records}))
    """
)


def main() -> None:
    parser = h.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="GRPO steps per child, the first not counted (default 4; 2 with --quick).")
    parser.add_argument("--trl-venv", default=None, help="Virtual environment with trl (default $RLVRX_BENCH_TRL_VENV or /work/.venv-trl).")
    args = parser.parse_args()
    if args.trl_venv:
        os.environ["RLVRX_BENCH_TRL_VENV"] = args.trl_venv
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 4)
    batch_size = 16 if args.quick else 128
    info = h.machine_info()

    from rlvrx.config import load_recipe
    from rlvrx.tiny import save_tiny_model
    from rlvrx.train.trainer import build_task

    recipe = load_recipe("quickstart")
    with h.Workdir(args.workdir, args.keep, "rlvrx-bench-grpo-") as work:
        model_dir = work / "model"
        if not model_dir.is_dir():
            save_tiny_model(model_dir, **recipe.model.tiny.model_dump())
        task = build_task(recipe)
        data_file = work / "prompts.jsonl"
        with open(data_file, "w") as f:
            for ex in task.train_examples():
                f.write(json.dumps({"prompt": "<bos>" + task.format_prompt(ex), "answer": ex.answer}) + "\n")
        rlvrx_script = work / "rlvrx_child.py"
        rlvrx_script.write_text(RLVRX_CHILD)
        trl_script = work / "trl_child.py"
        trl_script.write_text(TRL_CHILD)
        hf_script = work / "hf_loop_child.py"
        hf_script.write_text(HF_LOOP_CHILD)
        overrides = [f"grpo.batch_size={batch_size}", "grpo.lr=5e-5"]  # the lr of the TRL and hf-loop children
        contestants = {
            "rlvrx": lambda r: [sys.executable, rlvrx_script, work / f"run-{r}", steps, *overrides],
            "hf-loop": lambda r: [sys.executable, hf_script, model_dir, data_file, steps, batch_size],
        }
        trl_python, trl_note = h.peer_python("RLVRX_BENCH_TRL_VENV", "/work/.venv-trl", "trl")
        if trl_python:
            contestants["trl"] = lambda r: [trl_python, trl_script, model_dir, data_file, work / f"trl-{r}", steps, batch_size]
        else:
            print(f"trl: {trl_note}", flush=True)
        notes = {"trl": trl_note}

        runs: list[h.Run] = []
        for r in range(repeats):
            for name, make in contestants.items():
                run = h.check_ok(h.run_child(name, make(r), env={"PYTHONWARNINGS": "ignore"}))
                counted = run.inner["step_times"][1:] or run.inner["step_times"]
                print(
                    f"  {name:7s} steps {', '.join(f'{t:.2f}' for t in run.inner['step_times'])} s  process {run.wall_s:6.1f} s  "
                    f"anon {h.mib(run.peak_anon)}  load {run.load}",
                    flush=True,
                )
                run.inner["counted"] = counted
                runs.append(run)

        results: dict = {
            "machine": info,
            "batch_size": batch_size,
            "num_generations": 8,
            "max_new_tokens": 4,
            "steps_per_child": steps,
            "notes": notes,
            "contestants": {},
        }
        rows = []
        for name in contestants:
            sel = [r for r in runs if r.contestant == name]
            times = [t for r in sel for t in r.inner["counted"]]
            cpu = [rec["cpu"] for r in sel for rec in r.inner["records"][1:]]
            results["contestants"][name] = {
                "step_median": h.median(times),
                "step_min": min(times),
                "step_max": max(times),
                "step_times": [round(t, 3) for t in times],
                "cpu_median": h.median(cpu),
                "peak_anon_max": max(r.peak_anon for r in sel),
                "loads": [r.load for r in sel],
                "records": [r.inner["records"] for r in sel],
            }
            s = results["contestants"][name]
            rows.append([name, f"{s['step_median']:.2f}", h.spread(times), f"{s['cpu_median']:.2f}", h.mib(s["peak_anon_max"]), " | ".join(s["loads"])])
        h.print_table(
            f"GRPO step, {batch_size} prompts x 8 generations, <= 4 new tokens, CPU ({len(runs) // len(contestants)} children x {steps - 1} counted steps)",
            rows,
            ["trainer", "median s/step", "range s", "cpu s/step", "peak anon", "load avg at start of each child"],
        )
        c = results["contestants"]
        ratios = {}
        for peer in ("trl", "hf-loop"):
            if peer in c:
                ratios[f"{peer}_over_rlvrx_step"] = c[peer]["step_median"] / c["rlvrx"]["step_median"]
                ratios[f"cpu:{peer}_over_rlvrx_step"] = c[peer]["cpu_median"] / c["rlvrx"]["cpu_median"]
        results["ratios"] = ratios
        results["loadavg_end"] = h.loadavg()
        h.write_json(args.json, results)
        print("RATIO " + " ".join(f"{k}={v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
