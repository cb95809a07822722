"""Randomness of sampling: inverse-CDF draws and per-row uniform streams seeded from (seed, i, j).

Each row (prompt i, sample j) draws its uniforms from its own `torch.Generator` seeded from
`(seed, i, j)`, so a row's random stream depends neither on the other rows nor on the batch layout.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["inverse_cdf_sample", "row_uniforms", "row_seeds"]


def inverse_cdf_sample(logprobs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Column per row: first index where the cumulative probability exceeds u * total (float64)."""
    cdf = logprobs.double().exp().cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(uniforms.double().unsqueeze(-1) * total, total * (1 - 1e-15))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


def row_uniforms(seed: int | None, rows: Sequence[tuple[int, int]], steps: int) -> torch.Tensor:
    """[len(rows), steps] float64 uniforms; row (i, j) seeded from (seed, i, j) alone."""
    if seed is None:
        return torch.rand(len(rows), steps, dtype=torch.float64)
    out = torch.empty(len(rows), steps, dtype=torch.float64)
    gen = torch.Generator()
    seeds = row_seeds(int(seed) & (2**63 - 1), [i for i, _ in rows], [j for _, j in rows])
    for r, row_seed in enumerate(seeds.tolist()):
        gen.manual_seed(row_seed)
        out[r] = torch.rand(steps, generator=gen, dtype=torch.float64)
    return out


_SS_INIT_A, _SS_MULT_A, _SS_INIT_B, _SS_MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_SS_MIX_L, _SS_MIX_R, _SS_POOL = 0xCA01F9DD, 0x4973F715, 4


def row_seeds(seed: int, i: Sequence[int], j: Sequence[int]) -> np.ndarray:
    """uint64 per row: np.random.SeedSequence([seed, i, j]).generate_state(1, np.uint64)[0], vectorised.

    The same mixing as numpy's SeedSequence (pool of 4 uint32 words), for all rows at once instead
    of one SeedSequence object per row, which is slow next to a small GRPO step.
    """
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    if len(i) and (min(i.min(), j.min()) < 0 or max(i.max(), j.max()) >= 2**32):
        return np.array([np.random.SeedSequence([seed, int(a), int(b)]).generate_state(1, np.uint64)[0] for a, b in zip(i, j)], dtype=np.uint64)
    u32 = np.uint32
    seed_words = []
    while True:  # numpy splits an int into little-endian uint32 words
        seed_words.append(seed & 0xFFFFFFFF)
        seed >>= 32
        if not seed:
            break
    entropy = [np.full(len(i), w, dtype=u32) for w in seed_words] + [i.astype(u32), j.astype(u32)]
    hash_const = u32(_SS_INIT_A)

    def hashmix(value):
        nonlocal hash_const
        value = value ^ hash_const
        hash_const = hash_const * u32(_SS_MULT_A)
        value = value * hash_const
        return value ^ (value >> u32(16))

    def mix(x, y):
        result = u32(_SS_MIX_L) * x - u32(_SS_MIX_R) * y
        return result ^ (result >> u32(16))

    with np.errstate(over="ignore"):
        zero = np.zeros(len(i), dtype=u32)
        pool = [hashmix(entropy[k] if k < len(entropy) else zero) for k in range(_SS_POOL)]
        for src in range(_SS_POOL):
            for dst in range(_SS_POOL):
                if src != dst:
                    pool[dst] = mix(pool[dst], hashmix(pool[src]))
        for src in range(_SS_POOL, len(entropy)):
            for dst in range(_SS_POOL):
                pool[dst] = mix(pool[dst], hashmix(entropy[src]))
        out_const = u32(_SS_INIT_B)
        words = []
        for k in range(2):
            value = pool[k] ^ out_const
            out_const = out_const * u32(_SS_MULT_B)
            value = value * out_const
            words.append((value ^ (value >> u32(16))).astype(np.uint64))
    return words[0] | (words[1] << np.uint64(32))
