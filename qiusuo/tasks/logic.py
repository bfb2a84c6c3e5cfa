"""`linear_equations`: small systems of linear equations with a unique integer solution.

Difficulty is the number of unknowns (1–3: x; x, y; x, y, z). Coefficients are integers in
[-9, 9], solutions integers in [-9, 9], and the system's determinant is non-zero, so the answer
is unique and checkable by rule. Answer format `x=2,y=-1` (order and spaces free; one unknown
may also be answered with the bare number).

Worked solutions are short derivations a small model can copy:
- one unknown, `3x+5=20`: `3x=20-5=15,x=15/3=5`
- a system: Cramer's rule, `D=-5,Dx=-10,Dy=-5,x=-10/-5=2,y=-5/-5=1`
A "slip" derivation gets one intermediate value off by one and follows it through, so its
answer is wrong (possibly a fraction, written `x=14/3`).
"""

from __future__ import annotations

import random
import re
from fractions import Fraction

from qiusuo.rewards.accuracy import parse_number
from qiusuo.tasks.base import Problem, Task
from qiusuo.tasks.registry import register

VARS = "xyz"


def _det(m: list[list[int]]) -> int:
    if len(m) == 1:
        return m[0][0]
    return sum((-1) ** j * m[0][j] * _det([row[:j] + row[j + 1:] for row in m[1:]]) for j in range(len(m)))


def _term(coef: int, var: str, first: bool) -> str:
    sign = "-" if coef < 0 else ("" if first else "+")
    mag = abs(coef)
    return f"{sign}{'' if mag == 1 else mag}{var}"


def format_equation(coefs: list[int], rhs: int, const: int = 0) -> str:
    terms = [_term(c, v, not i) for i, (c, v) in enumerate((c, v) for c, v in zip(coefs, VARS) if c != 0)]
    lhs = "".join(t if i else t.lstrip("+") for i, t in enumerate(terms))
    if const:
        lhs += f"{const:+d}"
    return f"{lhs}={rhs}"


def _frac(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def parse_assignment(text: str, unknowns: int) -> dict[str, Fraction] | None:
    """`x=2,y=-1` (any order, `;` or `,` or spaces between) → {"x": 2, "y": -1}; None if invalid."""
    text = text.strip()
    if unknowns == 1 and (value := parse_number(text)) is not None:
        return {"x": value}
    pairs = [p for p in re.split(r"[,;\s]+(?=[a-z]\s*=)", text) if p.strip()]
    values: dict[str, Fraction] = {}
    for pair in pairs:
        name, sep, rhs = pair.partition("=")
        name = name.strip()
        value = parse_number(rhs.strip().rstrip(",;"))
        if not sep or name not in VARS[:unknowns] or name in values or value is None:
            return None
        values[name] = value
    return values if len(values) == unknowns else None


@register
class LinearEquations(Task):
    """Options: `unknowns` (default difficulty, 1)."""

    name = "linear_equations"
    difficulty_range = (1, 3)
    solution_styles = ("direct", "scratchpad", "slip")

    def __init__(self, unknowns: int = 1, **options):
        super().__init__(**options)
        lo, hi = self.difficulty_range
        if not lo <= unknowns <= hi:
            raise ValueError(f"unknowns must be in [{lo}, {hi}], got {unknowns}")
        self.default_difficulty = unknowns

    def sample(self, rng: random.Random, difficulty: int) -> tuple[str, str, dict]:
        n = difficulty
        solution = [rng.randint(-9, 9) for _ in range(n)]
        if n == 1:
            a, b = rng.choice([c for c in range(-9, 10) if c not in (0, 1)]), rng.randint(-20, 20)
            rhs = a * solution[0] + b
            question = format_equation([a], rhs, const=b)
            meta = {"matrix": [[a]], "const": [b], "rhs": [rhs], "solution": solution}
        else:
            while True:
                matrix = [[rng.randint(-9, 9) for _ in range(n)] for _ in range(n)]
                if _det(matrix) != 0 and all(any(row) for row in matrix):
                    break
            rhs = [sum(c * s for c, s in zip(row, solution)) for row in matrix]
            question = ",".join(format_equation(row, r) for row, r in zip(matrix, rhs))
            meta = {"matrix": matrix, "const": [0] * n, "rhs": rhs, "solution": solution}
        answer = ",".join(f"{v}={s}" for v, s in zip(VARS, solution))
        return question, answer, meta

    def instruction(self, question: str, metadata: dict) -> str:
        names = ", ".join(VARS[: len(metadata["solution"])])
        return f"Solve for {names}: {question.replace(',', '; ')}. Answer in the form x=..."

    def compact_prompt(self, question: str, metadata: dict) -> str:
        return f"{question}:"

    def check(self, problem: Problem, answer: str) -> float:
        solution = problem.metadata["solution"]
        values = parse_assignment(answer, len(solution))
        if values is None:
            return 0.0
        return 1.0 if all(values[v] == s for v, s in zip(VARS, solution)) else 0.0

    def derivation(self, problem: Problem, slip_at: int | None = None,
                   rng: random.Random | None = None) -> tuple[list[str], list[Fraction]]:
        """The derivation steps and the values they lead to; `slip_at` perturbs one quantity."""
        meta = problem.metadata
        n = len(meta["solution"])

        def maybe_slip(i: int, value: int) -> int:
            return value + rng.choice((-1, 1)) if i == slip_at else value

        if n == 1:
            a, b, rhs = meta["matrix"][0][0], meta["const"][0], meta["rhs"][0]
            moved = maybe_slip(0, rhs - b)
            x = Fraction(moved, a)
            steps = [f"{a}x={rhs}{-b:+d}={moved}", f"x={moved}/{a}={_frac(x)}"]
            return steps, [x]
        matrix, rhs = meta["matrix"], meta["rhs"]
        d = _det(matrix)  # slips go to the D_k only: a slipped D could leave x=y=0 unchanged
        dets = []
        for k in range(n):
            replaced = [row[:k] + [r] + row[k + 1:] for row, r in zip(matrix, rhs)]
            dets.append(maybe_slip(k + 1, _det(replaced)))
        values = [Fraction(dk, d) for dk in dets]
        steps = [f"D={d}"] + [f"D{v}={dk}" for v, dk in zip(VARS, dets)]
        steps += [f"{v}={dk}/{d}={_frac(val)}" for v, dk, val in zip(VARS, dets, values)]
        return steps, values

    def solution(self, problem: Problem, rng: random.Random, style: str) -> str:
        n = len(problem.metadata["solution"])
        if style == "direct":
            return f"<think></think><answer>{problem.answer}</answer>"
        if style == "scratchpad":
            steps, values = self.derivation(problem)
        elif style == "slip":
            steps, values = self.derivation(problem, slip_at=0 if n == 1 else rng.randint(1, n), rng=rng)
        else:
            raise ValueError(f"style must be one of {self.solution_styles}, got {style!r}")
        answer = ",".join(f"{v}={_frac(val)}" for v, val in zip(VARS, values))
        return f"<think>{','.join(steps)}</think><answer>{answer}</answer>"
