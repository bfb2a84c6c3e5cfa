"""Evaluation: pass@1 / pass@k / maj@k of a model on a task, through the engine; JSON + PNG reports."""

from .evaluate import EvalResult, evaluate
from .report import print_table, write_report

__all__ = ["EvalResult", "evaluate", "print_table", "write_report"]
