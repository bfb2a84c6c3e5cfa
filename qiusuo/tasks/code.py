"""`code`: write a Python function; the completion's code is run against unit tests in the sandbox.

    qiusuo.tasks.get("code", path="problems.jsonl")   # {"question", "signature", "tests", ...}

Each JSONL record holds the problem text (`question_field`), optionally the function signature
(`signature_field`, shown in the prompt), the tests (`tests_field`: a list of asserts, or one
string of them), optionally a reference solution (`solution_field`, used for worked solutions)
and optionally `"compare": "numeric"` (ints and floats compare by value, math.isclose with
rel_tol=abs_tol=1e-9) instead of the default exact types.

Tests are parsed here, in the trusted process, into a call and an expected value; only the call
(function name, literal arguments) goes to the sandbox, which runs the answer's code and sends
back the return value (design: sandbox_child.py). Supported forms, every argument and expected
value a Python literal:

    assert f(1, [2]) == 3          assert 3 == f(1, [2])        assert f(x=1) is None
    assert f(7)                    (expects True, exactly)     assert not f(8)  (False)
    assert math.isclose(f(2), 1.41, rel_tol=1e-3)              (numeric, given tolerance)

Anything else is refused when the file loads: running arbitrary test code would put the expected
values inside the interpreter the program controls. The comparison is exact: the types must
match all the way down (True is not 1, 1.0 is not 1, a tuple is not a list, a subclass is not its
base), so an object with an always-true `__eq__` can never pass. Accuracy is 1 when every test
passes (R1's rule for code), or the fraction passed (clamped to 0..total) with
`partial_credit=True`. Hostile, stuck or crashing programs fail their tests; a sandbox that cannot
confine the code refuses to run it (0, counted in `sandbox.stats()`) unless
`allow_weak_isolation=True`.
"""

from __future__ import annotations

import ast
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from qiusuo.tasks.base import Checked, Problem
from qiusuo.tasks.jsonl import JsonlTask, read_jsonl
from qiusuo.tasks.registry import register
from qiusuo.tasks.sandbox import Call, DecodedDict, DecodedSet, SandboxLimits, SandboxResult, canonical, run_many

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n?(.*?)```", re.DOTALL)


def extract_code(answer: str) -> str:
    """The code of an answer: the first ``` fenced block if there is one, else the whole text."""
    match = _FENCE.search(answer)
    return (match.group(1) if match else answer).strip("\n")


@dataclass(frozen=True)
class TestCase:
    """One parsed test: the call the sandbox makes, the value only this process knows, and the
    numeric tolerance (None: exact types)."""

    call: Call
    expected: object
    tolerance: tuple[float, float] | None = None


def _literal(node: ast.AST, test: str):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise ValueError(f"test {test!r}: {ast.unparse(node)!r} is not a Python literal ({e})") from None


def _call(node: ast.AST, test: str) -> Call | None:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        return None
    if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
        raise ValueError(f"test {test!r}: *args/**kwargs are not supported in test calls")
    args = tuple(_literal(a, test) for a in node.args)
    kwargs = {k.arg: _literal(k.value, test) for k in node.keywords}
    return Call(node.func.id, repr(args), repr(kwargs))


def parse_test(test: str, numeric: bool = False) -> TestCase:
    """`assert <call> == <literal>` and the other forms of the module docstring -> TestCase;
    ValueError naming the rule otherwise."""
    rule = ("supported tests are `assert f(<literals>) == <literal>` (or `is None/True/False`, bare "
            "`assert f(...)`, `assert not f(...)`, `assert math.isclose(f(...), <number>, ...)`)")
    try:
        tree = ast.parse(test.strip())
    except SyntaxError as e:
        raise ValueError(f"test {test!r} is not valid Python ({e.msg}); {rule}") from None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        raise ValueError(f"test {test!r} is not a single assert; {rule}")
    node = tree.body[0].test
    tol = (1e-9, 1e-9) if numeric else None
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        left, right, op = node.left, node.comparators[0], node.ops[0]
        call = _call(left, test)
        if call is None:
            left, right, call = right, left, _call(right, test)
        if call is not None and isinstance(op, ast.Eq):
            return TestCase(call, _literal(right, test), tol)
        if call is not None and isinstance(op, ast.Is) and isinstance(right, ast.Constant) and \
                right.value in (None, True, False):
            return TestCase(call, right.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not) and (call := _call(node.operand, test)):
        return TestCase(call, False)
    if isinstance(node, ast.Call) and ast.unparse(node.func) in ("math.isclose", "isclose") and \
            len(node.args) == 2 and (call := _call(node.args[0], test)):
        options = {k.arg: _literal(k.value, test) for k in node.keywords}
        if set(options) - {"rel_tol", "abs_tol"}:
            raise ValueError(f"test {test!r}: isclose takes only rel_tol and abs_tol")
        expected = _literal(node.args[1], test)
        if type(expected) not in (int, float):
            raise ValueError(f"test {test!r}: isclose needs a number to compare with")
        return TestCase(call, expected, (float(options.get("rel_tol", 1e-9)), float(options.get("abs_tol", 0.0))))
    if (call := _call(node, test)) is not None:
        return TestCase(call, True)
    raise ValueError(f"test {test!r} has an unsupported form; {rule}")


def _kind(v) -> str:
    t = type(v)
    return v.kind if t is DecodedSet else "dict" if t is DecodedDict else t.__name__


def _dict_items(v) -> list[tuple[str, object]]:
    return list(v.items) if type(v) is DecodedDict else [(canonical(k), x) for k, x in v.items()]


def same(expected, actual, tolerance: tuple[float, float] | None = None) -> bool:
    """Exact structural equality of plain values (actual ones as the sandbox decodes them): types
    must match at every level (bool is not int; 1.0 is not 1 unless `tolerance` allows int/float
    to compare by value). Sets and dict keys compare by `canonical` strings, exactly."""
    te, ta = type(expected), type(actual)
    if tolerance is not None and te in (int, float) and ta in (int, float):
        return math.isclose(expected, actual, rel_tol=tolerance[0], abs_tol=tolerance[1])
    kind = _kind(expected)
    if kind != _kind(actual):
        return False
    if kind in ("list", "tuple"):
        return len(expected) == len(actual) and all(same(e, a, tolerance) for e, a in zip(expected, actual))
    if kind == "dict":
        want, got = dict(_dict_items(expected)), _dict_items(actual)
        return len(got) == len(want) == len({k for k, _ in got}) and \
            all(k in want and same(want[k], x, tolerance) for k, x in got)
    if kind in ("set", "frozenset"):
        return canonical(expected) == canonical(actual)
    if te is not ta:
        return False
    if te is float and expected != expected:
        return actual != actual  # NaN expected: NaN returned
    return expected == actual  # None, bool, int, float, str, bytes, complex: builtin __eq__ only


def count_passed(cases: list[TestCase], result: SandboxResult) -> int:
    """Tests whose returned value matches, clamped to 0..len(cases)."""
    if result.values is None or result.timed_out or len(result.values) != len(cases):
        return 0
    passed = sum(1 for case, (kind, value) in zip(cases, result.values)
                 if kind == "value" and same(case.expected, value, case.tolerance))
    return max(0, min(len(cases), passed))


@register
class CodeTask(JsonlTask):
    """Options: `path`, `test_path`, `question_field`, `tests_field`, `signature_field`,
    `solution_field`, `partial_credit`, `limits` (SandboxLimits), `max_workers`,
    `allow_weak_isolation` (run the code even when the kernel refuses a sandbox layer; default:
    the environment variable QIUSUO_ALLOW_WEAK_SANDBOX=1, which `qiusuo --allow-weak-sandbox` sets)."""

    name = "code"
    solution_styles = ("direct",)

    def __init__(self, path: str | Path | None = None, question_field: str = "question",
                 tests_field: str = "tests", signature_field: str | None = "signature",
                 solution_field: str | None = "solution", partial_credit: bool = False,
                 limits: SandboxLimits | None = None, max_workers: int = 2,
                 allow_weak_isolation: bool | None = None, **options):
        if allow_weak_isolation is None:  # `qiusuo --allow-weak-sandbox` sets it for the whole run
            allow_weak_isolation = os.environ.get("QIUSUO_ALLOW_WEAK_SANDBOX") == "1"
        self.allow_weak_isolation = allow_weak_isolation
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
            numeric = record.get("compare", "exact")
            if numeric not in ("exact", "numeric"):
                raise ValueError(f"{where}: field 'compare' must be \"exact\" or \"numeric\", got {numeric!r}")
            try:
                cases = [parse_test(t, numeric == "numeric") for t in tests]
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            meta = {"source": str(path), "line": lineno, "tests": tests, "cases": cases,
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

    def check_many(self, problems, answers) -> list[Checked]:
        jobs = [(i, extract_code(a), p.metadata["cases"]) for i, (p, a) in enumerate(zip(problems, answers))
                if a is not None and a.strip()]
        results: list[Checked] = [Checked(0.0)] * len(problems)
        ran = run_many([(code, [c.call for c in cases]) for _, code, cases in jobs], self.limits,
                       self.max_workers, self.allow_weak_isolation)
        for (i, _, cases), r in zip(jobs, ran):
            passed, total = count_passed(cases, r), len(cases)
            accuracy = passed / total if self.partial_credit else float(passed == total)
            results[i] = Checked(min(1.0, max(0.0, accuracy)), r.timed_out, r.refused)
        return results

    def solution(self, problem: Problem, rng: random.Random, style: str) -> str:
        reference = problem.metadata.get("solution")
        if style != "direct" or not isinstance(reference, str):
            raise ValueError("code solutions need style='direct' and a solution field in the JSONL")
        return f"<think></think><answer>```python\n{reference}\n```</answer>"
