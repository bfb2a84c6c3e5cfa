"""Evaluation: pass@1 / pass@k / maj@k of a model on a task, through the engine (`evaluate`) or through a
real OpenAI-compatible server (`evaluate_served`); JSON + PNG reports."""

from .evaluate import EvalResult, evaluate
from .report import print_table, write_report
from .served import evaluate_served

__all__ = ["EvalResult", "evaluate", "evaluate_served", "print_table", "write_report"]
