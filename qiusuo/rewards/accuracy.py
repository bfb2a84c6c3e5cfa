"""Accuracy rewards (exact and numeric) and the TRL-compatible wrappers of every reward.

Each accuracy function compares a parsed answer with a ground-truth string and returns 1.0 or
0.0. `trl_reward` turns any `(answer_text, gold) -> float` into TRL's reward-function signature
`f(completions, **columns) -> list[float]` so users of `GRPOTrainer` can use ours and we can take
theirs: the answer is read from the strict `<answer>` block of each completion (a malformed
completion scores 0), and the gold from the column named `answer` unless told otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction

from qiusuo.rewards.format import completion_text, extract_answer, format_reward

# Numbers longer than this are not parsed: Fraction("1e999999999") would try to build a
# billion-digit integer. No honest answer to our tasks is this long.
MAX_NUMBER_CHARS = 64
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d{1,3})?(/[+-]?\d+)?")


def normalize_text(text: str) -> str:
    """Whitespace-collapsed, stripped, case-folded text for exact comparison."""
    return " ".join(text.split()).casefold()


def parse_number(text: str | None) -> Fraction | None:
    """An exact number from answer text, or None: accepts `1,234`, `$12`, `-3.5`, `7/2`, `1e3`,
    and a trailing period; rejects anything else (units, words, expressions)."""
    if text is None:
        return None
    s = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    if not s or len(s) > MAX_NUMBER_CHARS or not _NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def exact_match(answer: str | None, gold: str) -> float:
    """1.0 when the texts match after whitespace and case normalisation."""
    if answer is None:
        return 0.0
    return 1.0 if normalize_text(answer) == normalize_text(gold) else 0.0


def numeric_match(answer: str | None, gold: str, rel_tol: float = 0.0) -> float:
    """1.0 when both parse as numbers and are equal (exactly, or within `rel_tol`)."""
    a, g = parse_number(answer), parse_number(gold)
    if a is None or g is None:
        return 0.0
    if rel_tol == 0.0:
        return 1.0 if a == g else 0.0
    return 1.0 if abs(a - g) <= rel_tol * max(abs(g), Fraction(1)) else 0.0


def exact_or_numeric(answer: str | None, gold: str) -> float:
    """Numeric equality when the gold is a number, else exact text match."""
    if parse_number(gold) is not None:
        return numeric_match(answer, gold)
    return exact_match(answer, gold)


TRLRewardFn = Callable[..., list[float]]


def trl_reward(accuracy_fn: Callable[[str | None, str], float], answer_column: str = "answer") -> TRLRewardFn:
    """Wrap `accuracy_fn(answer_text, gold)` as a TRL reward `f(completions, **columns)`."""

    def reward(completions: Sequence, **columns) -> list[float]:
        if answer_column not in columns:
            raise ValueError(
                f"the reward needs a column {answer_column!r} with the gold answers; got columns "
                f"{sorted(columns)}. Pass it as {answer_column}=[...] or choose answer_column="
            )
        golds = columns[answer_column]
        if len(golds) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(golds)} gold answers; they must match")
        return [
            accuracy_fn(extract_answer(completion_text(c)), str(g)) for c, g in zip(completions, golds)
        ]

    reward.__name__ = f"{getattr(accuracy_fn, '__name__', 'accuracy')}_reward"
    return reward


def format_reward_func(completions: Sequence, **columns) -> list[float]:
    """TRL signature of the strict format reward."""
    return [format_reward(completion_text(c)) for c in completions]


exact_reward_func = trl_reward(exact_match)
numeric_reward_func = trl_reward(numeric_match)
