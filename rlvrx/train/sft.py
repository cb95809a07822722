"""SFT warm-up on the task's gold answers (a tiny random model needs it before GRPO sees any reward)."""

from __future__ import annotations

import numpy as np
import torch


def sft_batch(tokenizer, task, examples, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels) with labels only on the target and EOS."""
    rows = []
    for ex in examples:
        prompt = task.encode_prompt(ex, tokenizer)
        target = tokenizer(task.gold_completion(ex), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt, target))
    width = max(len(p) + len(t) for p, t in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, t) in enumerate(rows):
        seq = torch.tensor(p + t)
        ids[i, : len(seq)] = seq
        attn[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(t)
    return ids.to(device), attn.to(device), labels.to(device)


def run_sft(trainer, progress=None) -> list[dict]:
    """Supervised steps on gold completions; logs {"stage": "sft"} lines to metrics.jsonl."""
    cfg = trainer.recipe.sft
    model, tokenizer, task = trainer.model, trainer.tokenizer, trainer.task
    examples = trainer.train_examples
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0)
    records = []
    model.train()
    for i in range(cfg.steps):
        rng = np.random.default_rng([trainer.cfg.seed, 7919, i])
        idx = rng.choice(len(examples), size=cfg.batch_size, replace=cfg.batch_size > len(examples))
        ids, attn, labels = sft_batch(tokenizer, task, [examples[j] for j in idx], trainer.device)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        record = {"stage": "sft", "step": 0, "sft_step": i + 1, "loss": float(loss.detach())}
        records.append(record)
        trainer.log(record)
        if progress is not None:
            progress(record)
    model.eval()
    return records
