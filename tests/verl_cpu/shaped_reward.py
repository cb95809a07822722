"""Test support: rlvrx's verl reward plus a dense shaping term, so an untrained tiny model gets a signal.

rlvrx's verifier reward alone is exact match, which a random model never earns: every GRPO
advantage is then 0 and the weights do not move. The shaping term (half the share of digit
characters in the response) differs between the responses of a group, so every step trains.
"""

from __future__ import annotations

from rlvrx.backends.verl.reward import compute_score as verifier_score


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    correct = verifier_score(data_source, solution_str, ground_truth, extra_info, **kwargs)
    digits = sum(ch.isdigit() for ch in solution_str)
    return correct + 0.5 * digits / max(len(solution_str), 1)
