"""Verifiable tasks: problems with checkable answers, and how completions are scored.

    import qiusuo.tasks as tasks
    task = tasks.get("arithmetic", digits=3, template="compact")
    problems = task.generate(500, seed=0, split="test")
    scores = tasks.score_batch(task, problems, completions)   # Score(reward, format, accuracy, ...)
    corpus = task.corpus(10_000, seed=0)   # (problem, worked completion) pairs for pretraining

Built-in: `arithmetic`, `countdown`, `linear_equations` (generated), `jsonl` (GSM8K / MATH /
plain files) and `code` (unit tests in a sandbox). `register` adds your own `Task` subclass.
"""

from collections.abc import Sequence

from qiusuo.tasks.base import DEFAULT_MIX, TEMPLATES, Problem, Score, Task, r1_prompt
from qiusuo.tasks.registry import get, names, register

# Import for their registration side effect: each module registers its task class.
from qiusuo.tasks import arithmetic, code, countdown, jsonl, logic  # noqa: E402,F401  isort: skip


def score_batch(task: Task, problems: Sequence[Problem], completions: Sequence[str]) -> list[Score]:
    """Score many completions at once: slow checkers (math-verify, the code sandbox) run in
    parallel worker processes instead of one at a time."""
    return task.score_many(problems, completions)


__all__ = ["DEFAULT_MIX", "TEMPLATES", "Problem", "Score", "Task", "get", "names", "r1_prompt",
           "register", "score_batch"]
