import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from rlvrx.errors import UsageError
from rlvrx.verify.metrics import (
    ProblemOutcome,
    estimate_pass_at_k,
    maj_at_k,
    majority_vote,
    pass_at_k,
    summarize_problems,
    summarize_tasks,
)


def enumerated_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The fraction of k-subsets of n samples (the first c correct) holding at least one correct."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in subset) for subset in subsets), len(subsets))


def test_pass_at_k_equals_exhaustive_enumeration():
    checked = 0
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(enumerated_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)
                checked += 1
    assert checked == sum(n * (n + 1) for n in range(1, 9))


def test_pass_at_k_edge_values_and_large_n():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k: every 3-subset holds a correct sample
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - 21 / 45)
    # Large n where C(n, k) overflows floats: compare with exact rational arithmetic.
    n, c, k = 2000, 7, 64
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_estimate_pass_at_k_matches_per_problem_values():
    assert estimate_pass_at_k(4, [0, 1, 4], 2) == pytest.approx([0.0, 0.5, 1.0])
    assert estimate_pass_at_k([3, 6], [1, 2], 2) == pytest.approx([2 / 3, 1 - 6 / 15])


def test_majority_vote_hand_cases():
    # 2 votes for "2" beat 1 for "1"; the verdict is that of the first "2" sample.
    assert majority_vote(["1", "2", "2"], [False, True, True]) == ("2", True)
    # Tie 2-2: the answer voted for first wins, whatever its correctness.
    assert majority_vote(["1", "2", "2", None, "1"], [False, True, True, False, False]) == ("1", False)
    assert majority_vote(["2", "1", "1", "2"], [True, False, False, True]) == ("2", True)
    # Samples without an answer do not vote.
    assert majority_vote([None, None, "7"], [False, False, True]) == ("7", True)
    assert majority_vote([None, None], [False, False]) == (None, False)
    # maj@k uses the first k samples only.
    keys, correct = ["3", "5", "5", "3", "3"], [False, True, True, False, False]
    assert maj_at_k(keys, correct, 1) == 0.0
    assert maj_at_k(keys, correct, 3) == 1.0
    assert maj_at_k(keys, correct, 5) == 0.0
    with pytest.raises(ValueError):
        maj_at_k(keys, correct, 6)


def test_summary_of_one_task_by_hand_and_numpy():
    problems = [
        ProblemOutcome("a", [True, False, True, False], ["1", "2", "1", "2"]),
        ProblemOutcome("b", [False, False, False, False], ["3", "3", None, "4"]),
        ProblemOutcome("c", [True, True, True, False], ["5", "5", "5", "6"]),
    ]
    summary = summarize_problems(problems, k_list=[1, 2, 4, 8])
    accuracies = np.array([0.5, 0.0, 0.75])
    assert summary["problems"] == 3 and summary["n"] == 4
    assert summary["avg"] == pytest.approx(accuracies.mean())
    assert summary["avg_stderr"] == pytest.approx(accuracies.std(ddof=1) / np.sqrt(3))
    assert summary["pass@1"] == pytest.approx(accuracies.mean())
    assert summary["pass@2"] == pytest.approx((1 - 1 / 6 + 0 + 1) / 3)
    assert summary["pass@4"] == pytest.approx(2 / 3)
    assert "pass@8" not in summary and "maj@8" not in summary  # k above n is left out
    # maj@4: a ties 2-2 -> "1" (first), correct; b -> "3", wrong; c -> "5", correct.
    assert summary["maj@4"] == pytest.approx(2 / 3)
    assert summary["maj@1"] == pytest.approx(2 / 3)


def test_summary_over_tasks_is_the_macro_average():
    by_task = {
        "t1": [ProblemOutcome("a", [True, True]), ProblemOutcome("b", [False, True])],
        "t2": [ProblemOutcome("x", [False, False, True]), ProblemOutcome("y", [True, True, True]), ProblemOutcome("z", [False] * 3)],
    }
    result = summarize_tasks(by_task, k_list=[1, 2, 3])
    t1, t2, overall = result["t1"], result["t2"], result["overall"]
    assert t1["avg"] == pytest.approx(0.75) and t2["avg"] == pytest.approx(4 / 9)
    assert "pass@3" in t2 and "pass@3" not in t1
    assert overall["tasks"] == 2 and overall["problems"] == 5 and overall["n"] == 2
    assert overall["avg"] == pytest.approx((0.75 + 4 / 9) / 2)
    assert overall["pass@2"] == pytest.approx((t1["pass@2"] + t2["pass@2"]) / 2)
    assert "pass@3" not in overall
    assert overall["avg_stderr"] == pytest.approx(math.hypot(t1["avg_stderr"], t2["avg_stderr"]) / 2)
    assert overall["stderr"]["pass@2"] == pytest.approx(math.hypot(t1["stderr"]["pass@2"], t2["stderr"]["pass@2"]) / 2)
    assert set(overall["stderr"]) == {"avg", "pass@1", "pass@2", "maj@1", "maj@2"}
    assert "overall" not in summarize_tasks({"t1": by_task["t1"]})


def test_standard_errors_by_formula_and_by_enumerating_problem_resamples():
    """stderr = sd(per-problem values, ddof 1) / sqrt(N). Independent check: over all N^N draws of N problems
    with replacement (the bootstrap, enumerated exactly), the metric's variance is (N - 1) / N * stderr^2."""
    problems = [
        ProblemOutcome("a", [True, False, True, False], ["1", "2", "1", "2"]),
        ProblemOutcome("b", [False, False, False, False], ["3", "3", None, "4"]),
        ProblemOutcome("c", [True, True, True, False], ["5", "5", "5", "6"]),
        ProblemOutcome("d", [False, True, False, False], ["7", "8", "9", "7"]),
    ]
    summary = summarize_problems(problems, k_list=[1, 2, 4])
    errors = summary["stderr"]
    assert list(errors) == ["avg", "pass@1", "pass@2", "pass@4", "maj@1", "maj@2", "maj@4"]
    # by hand: pass@2 per problem = 1 - C(n - c, 2) / C(4, 2): a 5/6, b 0, c 1, d 1/2
    by_hand = np.array([5 / 6, 0.0, 1.0, 0.5])
    assert errors["pass@2"] == pytest.approx(by_hand.std(ddof=1) / 2, abs=1e-15)
    assert errors["avg"] == summary["avg_stderr"] == pytest.approx(np.array([0.5, 0, 0.75, 0.25]).std(ddof=1) / 2, abs=1e-15)
    n = len(problems)
    for metric in errors:
        k = int(metric.split("@")[1]) if "@" in metric else None
        per_problem = []
        for p in problems:
            if metric == "avg":
                per_problem.append(Fraction(p.c, p.n))
            elif metric.startswith("pass@"):
                per_problem.append(enumerated_pass_at_k(p.n, p.c, k))
            else:
                per_problem.append(Fraction(maj_at_k(p.answer_keys, p.correct, k)).limit_denominator())
        means = [sum(per_problem[i] for i in draw) / n for draw in itertools.product(range(n), repeat=n)]
        mean = sum(means) / len(means)
        variance = sum((m - mean) ** 2 for m in means) / len(means)
        assert errors[metric] ** 2 * (n - 1) / n == pytest.approx(float(variance), rel=1e-12, abs=1e-15), metric


def test_single_problem_has_no_stderr_and_bad_input_is_refused():
    assert summarize_problems([ProblemOutcome("a", [True, False])])["avg_stderr"] is None
    with pytest.raises(UsageError):
        summarize_problems([])
    with pytest.raises(UsageError):
        summarize_problems([ProblemOutcome("a", [])])
    with pytest.raises(UsageError):
        ProblemOutcome("a", [True, False], ["1"])
