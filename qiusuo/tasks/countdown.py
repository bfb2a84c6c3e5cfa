"""`countdown`: combine the given numbers with + − × ÷ to reach a target (TinyZero's task).

Rule (TinyZero's verl/utils/reward_score/countdown.py): each given number used exactly once; reward 1 for a right
equation, 0.1 for a well-formed completion whose equation is wrong, 0 otherwise. Unlike TinyZero
the equation is read from the strict `<answer>` block and evaluated exactly with the safe parser
of `qiusuo.rewards.expr` (never `eval`); a right value is an exact rational equality.

Difficulty is the number of operands (2–6). Problems are made solvable by construction: the
target is the value of a random combination of the numbers (non-negative intermediates, exact
division only). Compact prompt `44,19,35->28:`. Worked solutions come from a depth-first search
over pairwise combinations (budgeted; the generating combination is the fallback):
`<think>44-35=9,9+19=28</think><answer>(44-35)+19</answer>`. The "slip" style combines the numbers
into a wrong value but claims the target in its last step.

Search traces (options `tries`, `verify`; both off by default): a worked solution may first write up
to `tries` failed tries, each a random combination of all the numbers, restarting from the original
numbers, that misses the target, then the DFS's solution, and (a share `verify` of traces) a verify
line that recomputes the answer's expression: `<think>44+19=63,63+35=98;44-35=9,9+19=28;(44-35)+19=28</think>`.
Tries are separated by ";", steps by ",". The full DFS log is not written: for 3 numbers it visits
tens of leaves before a solution, too long for a tiny model's context and budget; random restarts
are a search a model can imitate and extend (`search_stats` counts retries and verifies).
A "guess" (a blurted answer) is a random combination of the given numbers: right only by chance.
"""

from __future__ import annotations

import random
from fractions import Fraction

from qiusuo.rewards.expr import safe_evaluate
from qiusuo.tasks.base import Problem, Task
from qiusuo.tasks.registry import register

# (value, expression text, is a bare number)
Item = tuple[Fraction, str, bool]


def _combine(a: Item, b: Item, op: str) -> Item | None:
    """a op b under the Countdown rules, or None when not allowed."""
    (va, ea, atom_a), (vb, eb, atom_b) = a, b
    if op == "+":
        v = va + vb
    elif op == "-":
        if va < vb:
            return None
        v = va - vb
    elif op == "*":
        v = va * vb
    else:
        if vb == 0 or (va / vb).denominator != 1:
            return None
        v = va / vb
    left, right = (ea if atom_a else f"({ea})"), (eb if atom_b else f"({eb})")
    return v, f"{left}{op}{right}", False


def _fmt(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def random_combination(rng: random.Random, numbers: list[int]) -> tuple[Fraction, str, list[str]]:
    """Combine all numbers in random order with random allowed ops: (value, expression, steps)."""
    items: list[Item] = [(Fraction(n), str(n), True) for n in numbers]
    steps = []
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        a, b = items[i], items[j]
        ops = ["+", "-", "*", "/"]
        rng.shuffle(ops)
        # "+" always works, so some (order, op) is allowed
        x, op, y, combined = next((x, op, y, c) for op in ops for x, y in ((a, b), (b, a))
                                  if (c := _combine(x, y, op)) is not None)
        steps.append(f"{_fmt(x[0])}{op}{_fmt(y[0])}={_fmt(combined[0])}")
        items = [it for k, it in enumerate(items) if k not in (i, j)] + [combined]
    return items[0][0], items[0][1], steps


def search(numbers: list[int], target: int, budget: int = 50_000) -> tuple[str, list[str]] | None:
    """A depth-first search for an equation reaching `target`: (expression, steps) or None."""
    nodes = 0

    def dfs(items: list[Item], steps: list[str]):
        nonlocal nodes
        nodes += 1
        if nodes > budget:
            return None
        if len(items) == 1:
            return (items[0][1], steps) if items[0][0] == target else None
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                rest = [it for k, it in enumerate(items) if k not in (i, j)]
                for op in "+-*/":
                    if op in "+*" and i > j:  # commutative: try each unordered pair once
                        continue
                    c = _combine(items[i], items[j], op)
                    if c is None:
                        continue
                    step = f"{_fmt(items[i][0])}{op}{_fmt(items[j][0])}={_fmt(c[0])}"
                    found = dfs(rest + [c], steps + [step])
                    if found is not None:
                        return found
        return None

    return dfs([(Fraction(n), str(n), True) for n in numbers], [])


@register
class Countdown(Task):
    """Options: `operands` (default difficulty, 3), `max_number` (100), `max_target` (1000), `tries` (most
    failed tries before a worked solution, drawn uniformly from 0..tries per trace; 0) and `verify` (share
    of worked solutions that end with a verify line; 0)."""

    name = "countdown"
    difficulty_range = (2, 6)
    solution_styles = ("direct", "scratchpad", "slip")

    def __init__(self, operands: int = 3, max_number: int = 100, max_target: int = 1000, tries: int = 0,
                 verify: float = 0.0, **options):
        super().__init__(**options)
        lo, hi = self.difficulty_range
        if not lo <= operands <= hi:
            raise ValueError(f"operands must be in [{lo}, {hi}], got {operands}")
        if max_number < 2 or max_target < 1:
            raise ValueError(f"need max_number >= 2 and max_target >= 1, got {max_number}, {max_target}")
        if tries < 0 or not 0.0 <= verify <= 1.0:
            raise ValueError(f"need tries >= 0 and verify in [0, 1], got tries={tries}, verify={verify}")
        self.default_difficulty, self.max_number, self.max_target = operands, max_number, max_target
        self.tries, self.verify = tries, verify

    def sample(self, rng: random.Random, difficulty: int) -> tuple[str, str, dict]:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(difficulty)]
            value, expression, _ = random_combination(rng, numbers)
            if value.denominator == 1 and 1 <= value <= self.max_target:
                target = int(value)
                question = f"{','.join(map(str, numbers))}->{target}"
                return question, expression, {"numbers": numbers, "target": target}

    def split_key(self, question: str, metadata: dict) -> str:
        return f"{sorted(metadata['numbers'])}->{metadata['target']}"

    def instruction(self, question: str, metadata: dict) -> str:
        return (f"Using the numbers {metadata['numbers']}, create an equation that equals "
                f"{metadata['target']}. You can use basic arithmetic operations (+, -, *, /) and each "
                f"number must be used exactly once.")

    def compact_prompt(self, question: str, metadata: dict) -> str:
        return f"{question}:"

    def check(self, problem: Problem, answer: str) -> float:
        evaluated = safe_evaluate(answer)
        if evaluated is None:
            return 0.0
        same_numbers = sorted(evaluated.numbers) == sorted(problem.metadata["numbers"])
        return 1.0 if same_numbers and evaluated.value == problem.metadata["target"] else 0.0

    def solution(self, problem: Problem, rng: random.Random, style: str) -> str:
        numbers, target = problem.metadata["numbers"], problem.metadata["target"]
        if style == "direct":
            found = search(numbers, target)
            return f"<think></think><answer>{found[0] if found is not None else problem.answer}</answer>"
        if style == "scratchpad":
            found = search(numbers, target)
            expression, steps = found if found is not None else (problem.answer, [])
        elif style == "slip":
            expression, steps = self._slip(rng, numbers, target)
        else:
            raise ValueError(f"style must be one of {self.solution_styles}, got {style!r}")
        lines = self._failed_tries(rng, numbers, target) + [",".join(steps)]
        if self.verify and rng.random() < self.verify and len(steps) > 1:  # one step: the line is its own check
            lines.append(f"{expression}={target}")
        return f"<think>{';'.join(lines)}</think><answer>{expression}</answer>"

    def guess(self, problem: Problem, rng: random.Random) -> str:
        """A blurted random combination of the given numbers: right only when it happens to hit the target."""
        return f"<think></think><answer>{random_combination(rng, problem.metadata['numbers'])[1]}</answer>"

    def _slip(self, rng: random.Random, numbers: list[int], target: int) -> tuple[str, list[str]]:
        for _ in range(100):
            value, expression, steps = random_combination(rng, numbers)
            if value != target:
                steps[-1] = steps[-1].rsplit("=", 1)[0] + f"={target}"
                return expression, steps
        raise ValueError(f"every combination of {numbers} reaches {target}; no slip possible")

    def _failed_tries(self, rng: random.Random, numbers: list[int], target: int) -> list[str]:
        """0..tries lines, each a random combination of all the numbers that misses the target."""
        if not self.tries:
            return []  # and draws nothing: traces without tries are those of before the option
        lines = []
        for _ in range(rng.randint(0, self.tries)):
            for _ in range(20):  # a miss whose every step stays within max_target: no 6-digit detours
                value, _, steps = random_combination(rng, numbers)
                if value != target and all(Fraction(x.rsplit("=", 1)[1]) <= self.max_target for x in steps):
                    lines.append(",".join(steps))
                    break
        return lines

    def search_stats(self, completion: str, problem: Problem) -> dict[str, int]:
        """How a completion searched: see `search_stats`."""
        return search_stats(completion, problem.metadata["numbers"], problem.metadata["target"])


def search_stats(completion: str, numbers: list[int], target: int) -> dict[str, int]:
    """Count the search inside a completion's think block (up to `</think>`, or the end if unclosed).

    The rule, matching the traces `Countdown` writes: the think block is split into lines at ";",
    a line into steps at ",", a step is `LHS=VALUE`. A line whose single step has two or more
    operators on its left is a *verify* (it recomputes a whole expression). Any other non-empty line
    is an *attempt*; its value is the VALUE of its last step. A *retry* is an attempt that follows a
    failed attempt (its value is not the target) and restarts from the original numbers (the two
    operands of its first step are among the given numbers). Values are read as written, not recomputed.
    Returns {"attempts", "retries", "verifies"}.
    """
    start = completion.find("<think>")
    body = completion[start + len("<think>"):] if start >= 0 else completion
    body = body.split("</think>", 1)[0]
    attempts = retries = verifies = 0
    last_failed = False
    for line in (x.strip() for x in body.split(";")):
        if not line:
            continue
        steps = line.split(",")
        lhs = steps[0].split("=", 1)[0]
        if len(steps) == 1 and sum(lhs.count(op) for op in "+-*/") >= 2:
            verifies += 1
            continue
        attempts += 1
        operands = _operands(lhs)
        restarts = operands is not None and all(o in numbers for o in operands)
        if last_failed and restarts:
            retries += 1
        last_failed = steps[-1].rsplit("=", 1)[-1].strip() != str(target)
    return {"attempts": attempts, "retries": retries, "verifies": verifies}


def _operands(lhs: str) -> tuple[int, int] | None:
    """The two integers of a one-operator step's left side ("44-35" -> (44, 35)), or None."""
    for op in "+-*/":
        left, sep, right = lhs.strip().partition(op)
        if sep and left.isdigit() and right.isdigit():
            return int(left), int(right)
    return None
