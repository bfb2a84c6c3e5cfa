"""Rule-based rewards: pure functions that score a completion, never a model.

- `format`: the strict `<think>…</think><answer>…</answer>` check and answer extraction.
- `accuracy`: exact and numeric answer matching, and `trl_reward`, which gives any of them
  TRL's `f(completions, **columns) -> list[float]` signature.
- `math`: math-verify grading in worker processes with a hard per-item timeout.
- `expr`: the safe arithmetic parser Countdown answers go through (never `eval`).
- `metrics`: unbiased pass@k and maj@k.

Importing this package is cheap: math-verify is imported only inside its worker processes.
"""

from qiusuo.rewards.accuracy import (
    exact_match,
    exact_or_numeric,
    exact_reward_func,
    format_reward_func,
    normalize_text,
    numeric_match,
    numeric_reward_func,
    parse_number,
    trl_reward,
)
from qiusuo.rewards.expr import ExpressionError, evaluate, safe_evaluate
from qiusuo.rewards.format import ParsedCompletion, extract_answer, format_reward, parse_completion
from qiusuo.rewards.math import MathVerifyPool, math_verify_reward
from qiusuo.rewards.metrics import maj_at_k, majority_answer, mean_pass_at_k, pass_at_k

__all__ = [
    "ExpressionError", "MathVerifyPool", "ParsedCompletion", "evaluate", "exact_match",
    "exact_or_numeric", "exact_reward_func", "extract_answer", "format_reward",
    "format_reward_func", "maj_at_k", "majority_answer", "math_verify_reward", "mean_pass_at_k",
    "normalize_text", "numeric_match", "numeric_reward_func", "parse_completion", "parse_number",
    "pass_at_k", "safe_evaluate", "trl_reward",
]  # fmt: skip
