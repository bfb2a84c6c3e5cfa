"""Sampling metrics as pure functions: unbiased pass@k and majority-vote maj@k.

pass@k follows Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", eq. 1):
with n samples of which c are correct, pass@k = 1 - C(n-c, k) / C(n, k), computed as a running
product so large n never overflows. It is the probability that at least one of k samples drawn
without replacement from the n is correct; averaging it over problems gives an unbiased estimate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c of them correct."""
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c,k)/C(n,k) = prod_{i=n-c+1}^{n} (1 - k/i)
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems given (n, c) per problem."""
    if not counts:
        raise ValueError("mean_pass_at_k needs at least one problem")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer; ties go to the one seen first."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(a for a in answers if a is not None and votes[a] == best)


def maj_at_k(answers: Sequence[str | None], gold: str | None = None,
             correct: Sequence[bool] | None = None) -> float:
    """1.0 when the majority answer among the samples is correct, else 0.0.

    Correctness is `answer == gold`, or, when `correct` is given (one flag per sample, e.g. from
    a task's scorer for answers with many right forms), the flag of a sample with the winning answer.
    Answers should be normalised by the caller (e.g. `parse_number`) so equal values vote together.
    """
    winner = majority_answer(answers)
    if winner is None:
        return 0.0
    if correct is not None:
        if len(correct) != len(answers):
            raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
        return 1.0 if correct[list(answers).index(winner)] else 0.0
    if gold is None:
        raise ValueError("maj_at_k needs the gold answer or per-sample correctness flags")
    return 1.0 if winner == gold else 0.0
