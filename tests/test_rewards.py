"""Rewards spec: the strict format, accuracy matching, TRL signatures, the safe expression parser,
pass@k / maj@k, and math-verify in a worker pool that survives pathological completions."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from pathlib import Path

import pytest

from qiusuo.rewards import (
    ExpressionError, MathVerifyPool, evaluate, exact_match, exact_reward_func, extract_answer,
    format_reward, format_reward_func, maj_at_k, math_verify_reward, mean_pass_at_k, numeric_match,
    numeric_reward_func, parse_completion, parse_number, pass_at_k, safe_evaluate, trl_reward,
)  # fmt: skip

GOOD = "<think>7+5=12,4+8+1=13,3+2+1=6</think><answer>632</answer>"


# --- format -------------------------------------------------------------------------------
def test_well_formed_completion_parses():
    parsed = parse_completion(GOOD)
    assert parsed.think == "7+5=12,4+8+1=13,3+2+1=6" and parsed.answer == "632"
    assert format_reward(GOOD) == 1.0
    assert format_reward("  <think>\nhmm\n</think>\n<answer> 632 </answer>\n") == 1.0
    assert extract_answer("<think></think><answer> 632 </answer>") == "632"
    assert format_reward("<think></think><answer></answer>") == 1.0  # empty blocks are still the format


@pytest.mark.parametrize("completion", [
    "632",
    "<answer>632</answer>",  # no think block
    "<think>7+5=12</think>",  # no answer block
    "<think>x</think>632",
    "<answer>632</answer><think>x</think>",  # wrong order
    "<think>a</think><think>b</think><answer>632</answer>",  # think repeated
    "<think>x</think><answer>632</answer><answer>632</answer>",  # answer repeated
    "<think>x</think><answer>631</answer><answer>632</answer>",  # several answers, hoping one matches
    "<think><answer>632</answer></think><answer>632</answer>",  # answer inside think
    "<think>x<think>y</think></think><answer>632</answer>",  # nested think
    "<think>x</think><answer><answer>632</answer></answer>",  # nested answer
    "<think>x</think><answer>632</answer> and also 633",  # text after </answer>
    "Sure! <think>x</think><answer>632</answer>",  # text before <think>
    "<think>x</think> so <answer>632</answer>",  # text between the blocks
    "<think>x</think><answer>632",  # unterminated
    "<think>x</think><answer>632</answer></answer>",
])  # fmt: skip
def test_malformed_and_hacking_completions_earn_nothing(completion):
    assert format_reward(completion) == 0.0
    assert extract_answer(completion) is None


def test_format_is_linear_on_a_megabyte():
    big = "<think>" + "<" * 1_000_000 + "</think><answer>1</answer>"
    assert format_reward(big) == 1.0
    assert format_reward("<think>" * 500_000) == 0.0


# --- accuracy -------------------------------------------------------------------------------
@pytest.mark.parametrize("text,value", [
    ("42", 42), ("-7", -7), ("1,234", 1234), ("$12", 12), ("3.50", Fraction(7, 2)), ("7/2", Fraction(7, 2)),
    ("42.", 42), ("1e3", 1000), (" 5 ", 5),
])  # fmt: skip
def test_parse_number_accepts(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["", "abc", "4 2 apples", "1/0", "2+2", "9" * 100, "1e99999999", None])
def test_parse_number_rejects(text):
    assert parse_number(text) is None


def test_exact_and_numeric_match():
    assert exact_match("  Paris ", "paris") == 1.0 and exact_match("Lyon", "Paris") == 0.0
    assert exact_match(None, "x") == 0.0
    assert numeric_match("1,234", "1234") == 1.0 and numeric_match("0.5", "1/2") == 1.0
    assert numeric_match("1233", "1234") == 0.0 and numeric_match("many", "1234") == 0.0
    assert numeric_match("3.1416", "3.14159", rel_tol=1e-4) == 1.0


def test_trl_signatures():
    completions = [GOOD, "<think></think><answer>631</answer>", "632"]
    assert format_reward_func(completions) == [1.0, 1.0, 0.0]
    assert numeric_reward_func(completions, answer=["632"] * 3, prompts=["p"] * 3) == [1.0, 0.0, 0.0]
    # conversational completions: a list of messages per completion
    chat = [[{"role": "assistant", "content": GOOD}]]
    assert exact_reward_func(chat, answer=["632"]) == [1.0]
    # bring your own accuracy function, with a custom gold column
    mine = trl_reward(lambda ans, gold: float(ans is not None and ans.startswith(gold)), answer_column="solution")
    assert mine([GOOD], solution=["63"]) == [1.0]
    with pytest.raises(ValueError, match="column 'answer'"):
        exact_reward_func(completions)


# --- safe expression parser ---------------------------------------------------------------
def test_evaluate_is_exact_and_reports_numbers():
    e = evaluate("(44 - 35) + 19")
    assert e.value == 28 and e.numbers == (44, 35, 19)
    assert evaluate("7/2").value == Fraction(7, 2)
    assert evaluate("2×3÷4").value == Fraction(3, 2)
    assert evaluate("1+2*3").value == 7 and evaluate("(1+2)*3").value == 9


@pytest.mark.parametrize("text", [
    "__import__('os').system('touch /tmp/qiusuo_pwned')", "9**9**9", "2^10", "-5+3", "1/0", "(1+2",
    "1+2)", "((((((((((((((((((1))))))))))))))))))", "1" * 7, "1+" * 150 + "1", "", "abs(-3)", "1.5*2",
])  # fmt: skip
def test_evaluate_rejects_unsafe_or_malformed(text):
    with pytest.raises(ExpressionError):
        evaluate(text)
    assert safe_evaluate(text) is None
    assert not Path("/tmp/qiusuo_pwned").exists()


# --- metrics --------------------------------------------------------------------------------
def _brute_pass_at_k(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_known_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(10, 1, 10) == 1.0
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    for n, c, k in itertools.product(range(1, 8), range(0, 8), range(1, 8)):
        if c <= n and k <= n:
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k))
    assert pass_at_k(1000, 10, 1) == pytest.approx(0.01)
    assert 0.0 < pass_at_k(10_000, 1, 100) < 1.0 and math.isfinite(pass_at_k(10_000, 3, 5000))
    assert mean_pass_at_k([(5, 2), (5, 0)], 1) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)


def test_maj_at_k():
    assert maj_at_k(["632", "632", "631"], gold="632") == 1.0
    assert maj_at_k(["631", "631", "632"], gold="632") == 0.0
    assert maj_at_k(["631", "632"], gold="632") == 0.0  # tie: the first seen wins
    assert maj_at_k([None, None, "632"], gold="632") == 1.0  # unparsed samples do not vote
    assert maj_at_k([None, None], gold="632") == 0.0
    assert maj_at_k(["a", "b", "b"], correct=[False, True, True]) == 1.0


# --- math-verify pool -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool():
    with MathVerifyPool(num_workers=2, timeout_s=2.0) as p:
        yield p


def test_math_verify_grades_equivalent_forms(pool):
    results = pool.verify_many([
        ("$\\frac{1}{3}$", "1/3"), ("$\\frac{1}{3}$", "\\frac{1}{3}"), ("$\\frac{1}{2}$", "0.5"),
        ("$\\sqrt{2}$", "\\sqrt{2}"), ("$\\frac{1}{3}$", "0.5"), ("$2$", None), ("$2$", ""),
    ])  # fmt: skip
    assert [score for score, _ in results] == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert not any(timed_out for _, timed_out in results)


def test_pathological_answers_score_zero_and_the_pool_survives(pool, tmp_path):
    marker = tmp_path / "pwned"
    before = pool.num_timeouts
    results = pool.verify_many([
        ("$2$", "1" * 1_000_000),  # 1 MB: rejected unparsed
        ("$2$", "(" * 1500 + "2" + ")" * 1500),  # deep nesting
        ("$2$", f"__import__('os').system('touch {marker}')"),
        ("$2$", "$9^{9^{9}}$"),  # SymPy would build a 370-million-digit integer: hits the hard timeout
        ("$2$", "9**9**9"),
        ("$2$", "2"),  # the pool still works after killing workers
    ])  # fmt: skip
    assert [score for score, _ in results] == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert results[3][1] is True  # the huge power is the timeout path
    assert pool.num_timeouts >= before + 1 and pool.num_rejected >= 1
    assert not marker.exists()
    assert pool.verify("$\\frac{1}{2}$", "\\frac{2}{4}") == (1.0, False)


def test_math_verify_trl_wrapper(pool):
    reward = math_verify_reward(pool)
    completions = ["<think></think><answer>\\frac{2}{4}</answer>", "<think></think><answer>3</answer>", "1/2"]
    assert reward(completions, answer=["$\\frac{1}{2}$"] * 3) == [1.0, 0.0, 0.0]
