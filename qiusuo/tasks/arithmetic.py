"""`arithmetic`: multi-digit + − × with column scratchpads, the task of the CPU demo.

Difficulty is the number of digits of each operand. Subtraction orders its operands so the
result is never negative. Compact prompt `347+285=`; completion
`<think>7+5=12,4+8+1=13,3+2+1=6</think><answer>632</answer>` (R1-Zero's tag format, arXiv:2501.12948).

Scratchpads, least significant column first, each step one short equation:
- `+`: `x+y(+1)=s`, the column sum with the incoming carry; digit s%10, carry s//10; the last
  step's full sum leads the answer.           347+285 → 7+5=12,4+8+1=13,3+2+1=6 → 632
- `-`: `x-y(-1)=s`, the column difference with the incoming borrow; a negative s means
  "borrow": digit s+10.                        632-285 → 2-5=-3,3-8-1=-6,6-2-1=3 → 347
- `*`: one partial product per digit of the second operand (already shifted), then their sum.
                                               347*25 → 347*5=1735,347*20=6940,1735+6940=8675
A "guess" solution (the blurt of the pretraining mix, tasks/base.py) is `<think></think>` and the
answer of another random problem with the same operator and digits: `347+285=` may be answered
`<think></think><answer>1108</answer>`. Two random 3-digit sums agree with probability
sum_s P(s)^2 = 0.074% (`guess_chance`), so that is the accuracy of blurting in any base trained on
this corpus. A "slip" solution is a scratchpad with one step off by one unit of its column, propagated
consistently: every later step and the answer follow from the wrong value, as a model that
slipped would write it. The answer is then a + b + δ·10^k, never the right one.

Addition has a second scratchpad, `scratchpad="rewrite"` (the default is "columns", above). The columns
scratchpad reads the k-th digit of each operand at a fixed distance back into the prompt, so a model
trained on 3-digit sums has never read a 4th column and scores 0 on 4-digit ones. "rewrite" passes
the state instead: after each column it rewrites what is left of the problem, so every read is local
(the token before the most recent `+`, the most recent `=`) and no read depends on the operand length,
the property that length-generalising formats share (RASP-L, Zhou et al. 2023, arXiv:2310.16028;
a scratchpad that carries the state, Lee et al. 2023, arXiv:2307.03381 §4; index-free alternatives such
as reversed outputs with index hints are Zhou et al. 2024, arXiv:2402.09371). Each column is an
equation `x+y+c=s` whose digits are read from the state, then the new state `A+B=c:S` (the operands'
remaining prefixes, the carry, the answer digits so far); the last column writes the answer itself,
its sum then the digits so far, so the answer is a copy.
                                  347+285 → 7+5+0=12,34+28=1:2,4+8+1=13,3+2=1:32,3+2+1=6,632
The prompt `347+285=` is the first state (carry 0, no digits yet). A slip propagates through the state:
its carry and digit are written into every later state and the answer. Measured (README, Transfer): the
copies of the prefixes do grow with the operands, and a base pretrained on 1-3 digits writes them no longer
than 2 digits, so 4-digit sums stay at 0% before and after RL.
"""

from __future__ import annotations

import random

from qiusuo.rewards.accuracy import parse_number
from qiusuo.tasks.base import Problem, Task
from qiusuo.tasks.registry import register

OPS = "+-*"
SCRATCHPADS = ("columns", "rewrite")


def _digits(n: int) -> list[int]:
    """Decimal digits, least significant first."""
    return [int(c) for c in reversed(str(n))]


def _join(last: int, lower: list[int]) -> int:
    """The number whose top 'digit' is `last` (may be ≥ 10) above the lower digits (lsd first)."""
    return int(str(last) + "".join(str(d) for d in reversed(lower)))


def _slipped(value: int, rng: random.Random, lo: int, hi: int) -> int:
    options = [v for v in (value - 1, value + 1) if lo <= v <= hi]
    return rng.choice(options)


def add_steps(a: int, b: int, slip_at: int | None = None, rng: random.Random | None = None) -> tuple[list[str], int]:
    da, db = _digits(a), _digits(b)
    width = max(len(da), len(db))
    steps, lower, carry, last = [], [], 0, 0
    for i in range(width):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        if i == slip_at:
            s = _slipped(s, rng, 0, 19)  # ≤ 19 keeps the carry a single 1
        steps.append(f"{x}+{y}{'+1' if carry else ''}={s}")
        if i < width - 1:
            lower.append(s % 10)
            carry = s // 10
        else:
            last = s
    return steps, _join(last, lower)


def sub_steps(a: int, b: int, slip_at: int | None = None, rng: random.Random | None = None) -> tuple[list[str], int]:
    assert a >= b, (a, b)
    da, db = _digits(a), _digits(b)
    width = len(da)
    steps, lower, borrow, last = [], [], 0, 0
    for i in range(width):
        x, y = da[i], (db[i] if i < len(db) else 0)
        s = x - y - borrow
        if i == slip_at:
            # the top column must stay ≥ 0 (the answer has no sign); lower ones range -10..9
            s = _slipped(s, rng, 0 if i == width - 1 else -10, 9)
        steps.append(f"{x}-{y}{'-1' if borrow else ''}={s}")
        if i < width - 1:
            lower.append(s % 10)
            borrow = 1 if s < 0 else 0
        else:
            last = s
    return steps, _join(last, lower)


def mul_steps(a: int, b: int, slip_at: int | None = None, rng: random.Random | None = None) -> tuple[list[str], int]:
    partials = []
    steps = []
    for i, d in enumerate(_digits(b)):
        p = a * d * 10**i
        if i == slip_at:
            p = _slipped(p // 10**i, rng, 0, 10**12) * 10**i
        partials.append(p)
        steps.append(f"{a}*{d * 10**i}={p}")
    total = sum(partials)
    if len(partials) > 1:
        steps.append("+".join(map(str, partials)) + f"={total}")
    return steps, total


def add_rewrite_steps(a: int, b: int, slip_at: int | None = None,
                      rng: random.Random | None = None) -> tuple[list[str], int]:
    """The "rewrite" scratchpad (module docstring): per column an equation and the state it leaves,
    the last column's equation followed by the answer. A missing digit of a shorter operand reads 0."""
    rest_a, rest_b = str(a), str(b)  # what is left of each operand; the last digit is the next column's
    steps, carry, done = [], 0, ""  # `done`: the answer's digits so far, most significant first
    column = 0
    while True:
        x, y = int(rest_a[-1:] or 0), int(rest_b[-1:] or 0)
        rest_a, rest_b = rest_a[:-1], rest_b[:-1]
        s = x + y + carry
        if column == slip_at:
            s = _slipped(s, rng, 0, 19)  # ≤ 19 keeps the carry a single 1
        steps.append(f"{x}+{y}+{carry}={s}")
        if not rest_a and not rest_b:
            steps.append(f"{s}{done}")
            return steps, int(steps[-1])
        carry, done = s // 10, f"{s % 10}{done}"
        steps.append(f"{rest_a}+{rest_b}={carry}:{done}")
        column += 1


STEP_FNS = {"+": add_steps, "-": sub_steps, "*": mul_steps}


def guess_chance(op: str, digits: int) -> float:
    """Probability that two independent random problems (`op`, `digits` digits each) have the same
    answer: the accuracy of a "guess" blurt, and of any model that learned to blurt from the corpus."""
    from collections import Counter

    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    if (hi - lo + 1) ** 2 > 4_000_000:
        raise ValueError(f"guess_chance enumerates every operand pair; {digits} digits is too many")
    counts = Counter({"+": a + b, "-": abs(a - b), "*": a * b}[op] for a in range(lo, hi + 1) for b in range(lo, hi + 1))
    total = (hi - lo + 1) ** 2
    return sum((c / total) ** 2 for c in counts.values())


@register
class Arithmetic(Task):
    """Options: `digits` (default difficulty, 3), `ops` (any of "+-*", default "+": the demo), `scratchpad`
    ("columns", the default, or "rewrite": the state-passing scratchpad of the module docstring, addition only)."""

    name = "arithmetic"
    difficulty_range = (1, 12)
    solution_styles = ("direct", "scratchpad", "slip")  # and "guess" (Task.guess)

    def __init__(self, digits: int = 3, ops: str = "+", scratchpad: str = "columns", **options):
        super().__init__(**options)
        if not ops or any(op not in OPS for op in ops):
            raise ValueError(f"ops must be a non-empty string of characters from {OPS!r}, got {ops!r}")
        self.ops = "".join(dict.fromkeys(ops))
        if scratchpad not in SCRATCHPADS:
            raise ValueError(f"scratchpad must be one of {SCRATCHPADS}, got {scratchpad!r}")
        if scratchpad == "rewrite" and self.ops != "+":
            raise ValueError(f"scratchpad 'rewrite' is written for addition only; use ops='+' (got {ops!r}) "
                             f"or scratchpad 'columns'")
        self.scratchpad = scratchpad
        lo, hi = self.difficulty_range
        if not lo <= digits <= hi:
            raise ValueError(f"digits must be in [{lo}, {hi}], got {digits}")
        self.default_difficulty = digits

    def sample(self, rng: random.Random, difficulty: int, op: str | None = None) -> tuple[str, str, dict]:
        lo = 0 if difficulty == 1 else 10 ** (difficulty - 1)
        a, b = rng.randint(lo, 10**difficulty - 1), rng.randint(lo, 10**difficulty - 1)
        op = op or rng.choice(self.ops)
        if op == "-" and a < b:
            a, b = b, a
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        return f"{a}{op}{b}", str(result), {"op": op, "a": a, "b": b}

    def guess_source(self, problem: Problem, rng: random.Random) -> tuple[str, str, dict]:
        """A random problem with the same operator and digits (the operands are not looked at)."""
        meta = problem.metadata
        return self.sample(rng, meta.get("difficulty", self.default_difficulty), op=meta["op"])

    def split_key(self, question: str, metadata: dict) -> str:
        a, b, op = metadata["a"], metadata["b"], metadata["op"]
        if op in "+*":  # commutative: 285+347 is the same problem as 347+285
            a, b = min(a, b), max(a, b)
        return f"{a}{op}{b}"

    def instruction(self, question: str, metadata: dict) -> str:
        return f"What is {metadata['a']} {metadata['op']} {metadata['b']}?"

    def compact_prompt(self, question: str, metadata: dict) -> str:
        return f"{question}="

    def check(self, problem: Problem, answer: str) -> float:
        value = parse_number(answer)
        return 1.0 if value is not None and value == int(problem.answer) else 0.0

    def steps(self, problem: Problem, slip_at: int | None = None,
              rng: random.Random | None = None) -> tuple[list[str], int]:
        """The scratchpad steps and the answer they lead to (with a slip at step `slip_at`)."""
        meta = problem.metadata
        fn = add_rewrite_steps if self.scratchpad == "rewrite" else STEP_FNS[meta["op"]]
        return fn(meta["a"], meta["b"], slip_at, rng)

    def solution(self, problem: Problem, rng: random.Random, style: str) -> str:
        if style == "direct":
            return f"<think></think><answer>{problem.answer}</answer>"
        if style == "scratchpad":
            steps, answer = self.steps(problem)
        elif style == "slip":
            # "*" slips in a partial product; its last step (the sum) follows from them
            meta = problem.metadata
            n_slippable = (len(_digits(meta["b"])) if meta["op"] == "*" else
                           max(len(_digits(meta["a"])), len(_digits(meta["b"]))))  # one step per column
            steps, answer = self.steps(problem, slip_at=rng.randrange(n_slippable), rng=rng)
        else:
            raise ValueError(f"style must be one of {self.solution_styles}, got {style!r}")
        return f"<think>{','.join(steps)}</think><answer>{answer}</answer>"
