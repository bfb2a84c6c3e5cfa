"""`code`: write a Python function; the completion's code is run against unit tests in the sandbox.

    qiusuo.tasks.get("code", path="problems.jsonl")   # {"question", "signature", "tests", ...}

Each JSONL record holds the problem text (`question_field`), optionally the function signature
(`signature_field`, shown in the prompt), the tests (`tests_field`: a list of Python snippets,
typically `assert f(2) == 4`, or one string of them), and optionally a reference solution
(`solution_field`, used for worked solutions). The answer block's code, with or without a
``` fence, runs in `qiusuo.tasks.sandbox` (separate, confined process; never in this process).
Accuracy is 1 when every test passes (R1's rule for code, reference/deepseek.md §5.2), or the
fraction passed with `partial_credit=True`. Hostile or stuck programs simply fail their tests.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from qiusuo.tasks.base import Problem
from qiusuo.tasks.jsonl import JsonlTask, read_jsonl
from qiusuo.tasks.registry import register
from qiusuo.tasks.sandbox import SandboxLimits, run_many

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)```", re.DOTALL)


def extract_code(answer: str) -> str:
    """The code of an answer: the first ``` fenced block if there is one, else the whole text."""
    match = _FENCE.search(answer)
    return (match.group(1) if match else answer).strip("\n")


@register
class CodeTask(JsonlTask):
    """Options: `path`, `test_path`, `question_field`, `tests_field`, `signature_field`,
    `solution_field`, `partial_credit`, `limits` (SandboxLimits), `max_workers`."""

    name = "code"
    solution_styles = ("direct",)

    def __init__(self, path: str | Path | None = None, question_field: str = "question",
                 tests_field: str = "tests", signature_field: str | None = "signature",
                 solution_field: str | None = "solution", partial_credit: bool = False,
                 limits: SandboxLimits | None = None, max_workers: int = 2, **options):
        self.tests_field, self.signature_field, self.solution_field = tests_field, signature_field, solution_field
        self.partial_credit, self.max_workers = partial_credit, max_workers
        self.limits = limits if limits is not None else SandboxLimits()
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        super().__init__(path=path, question_field=question_field, answer_field=tests_field, **options)

    def _load(self, path) -> list[Problem]:
        problems = []
        for lineno, record in read_jsonl(path, [self.question_field, self.tests_field]):
            where = f"{path}:{lineno}"
            question, tests = record[self.question_field], record[self.tests_field]
            if isinstance(tests, str):
                tests = [tests]
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{where}: field {self.question_field!r} must be a non-empty string")
            if not tests or not all(isinstance(t, str) and t.strip() for t in tests):
                raise ValueError(f"{where}: field {self.tests_field!r} must be a non-empty list of code strings")
            meta = {"source": str(path), "line": lineno, "tests": tests,
                    "signature": record.get(self.signature_field, "") if self.signature_field else "",
                    "solution": record.get(self.solution_field) if self.solution_field else None}
            if not isinstance(meta["signature"], str):
                raise ValueError(f"{where}: field {self.signature_field!r} must be a string")
            answer = meta["solution"] if isinstance(meta["solution"], str) else "\n".join(tests)
            problems.append(self.make_problem(question, answer, meta))
        return problems

    def instruction(self, question: str, metadata: dict) -> str:
        signature = metadata.get("signature")
        text = question.strip()
        if signature:
            text += f"\nComplete this function:\n```python\n{signature}\n```"
        return text + "\nWrite the complete Python code in the answer."

    def compact_prompt(self, question: str, metadata: dict) -> str:
        return self.instruction(question, metadata)

    def check(self, problem: Problem, answer: str) -> float:
        return self.check_many([problem], [answer])[0][0]

    def check_many(self, problems, answers) -> list[tuple[float, bool]]:
        jobs = [(i, extract_code(a), p.metadata["tests"]) for i, (p, a) in enumerate(zip(problems, answers))
                if a is not None and a.strip()]
        results: list[tuple[float, bool]] = [(0.0, False)] * len(problems)
        ran = run_many([(code, tests) for _, code, tests in jobs], self.limits, self.max_workers)
        for (i, _, _), r in zip(jobs, ran):
            accuracy = r.passed / r.total if self.partial_credit else float(r.ok)
            results[i] = (accuracy, r.timed_out)
        return results

    def solution(self, problem: Problem, rng: random.Random, style: str) -> str:
        reference = problem.metadata.get("solution")
        if style != "direct" or not isinstance(reference, str):
            raise ValueError("code solutions need style='direct' and a solution field in the JSONL")
        return f"<think></think><answer>```python\n{reference}\n```</answer>"
