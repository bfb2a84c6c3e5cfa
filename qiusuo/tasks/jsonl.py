"""`jsonl`: problems read from a JSONL file with a field mapping.

    qiusuo.tasks.get("jsonl", path="gsm8k_test.jsonl", question_field="question",
                     answer_field="answer", answer_format="gsm8k")

Answer formats (the gold is extracted once, at load time):
- "gsm8k": the text after the last `####`, commas removed (as TinyZero's gsm8k reward does); the
  model's `<answer>` is compared numerically (or exactly, if the gold is not a number).
- "boxed": the content of the last `\\boxed{...}` (MATH solutions), or the whole field when it
  has no `\\boxed`; graded with math-verify in a worker pool with a hard timeout.
- "plain": the stripped field; numeric comparison when both are numbers, else exact text.

Every record must parse: a malformed line raises `ValueError("<path>:<line>: ...")`. Only
whitespace-only lines, which hold no record, are passed over. Splits: `test_path` names a
separate held-out file; without it the rows of `path` are hash-partitioned by question text
(`test_fraction`), like the generated tasks.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from qiusuo.rewards.accuracy import exact_or_numeric
from qiusuo.tasks.base import SPLITS, Problem, Task
from qiusuo.tasks.registry import register

ANSWER_FORMATS = ("gsm8k", "boxed", "plain")


def read_jsonl(path: str | Path, required: Sequence[str]) -> list[tuple[int, dict]]:
    """(line number, record) for every record; ValueError naming file and line on any defect."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no JSONL file at {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            missing = [name for name in required if name not in record]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing field(s) {missing}; the record has {sorted(record)}")
            records.append((lineno, record))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (balanced braces), or None if there is none."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j]
    return None


def extract_gold(raw, answer_format: str, where: str) -> str:
    if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
        raise ValueError(f"{where}: the answer must be a string or a number, got {type(raw).__name__}")
    text = str(raw)
    if answer_format == "gsm8k":
        if "####" not in text:
            raise ValueError(f"{where}: a GSM8K answer needs '#### <number>'; got {text[-60:]!r}")
        gold = text.rsplit("####", 1)[1].strip().replace(",", "")
    elif answer_format == "boxed":
        gold = last_boxed(text) if "\\boxed" in text else text.strip()
        if gold is None:
            raise ValueError(f"{where}: unbalanced braces in \\boxed{{...}}")
        gold = gold.strip()
    else:
        gold = text.strip()
    if not gold:
        raise ValueError(f"{where}: empty answer")
    return gold


@register
class JsonlTask(Task):
    """Options: `path`, `question_field`, `answer_field`, `answer_format`, `test_path`,
    `difficulty_field`, and for "boxed": `math_workers`, `math_timeout_s`."""

    name = "jsonl"

    def __init__(self, path: str | Path | None = None, question_field: str = "question",
                 answer_field: str = "answer", answer_format: str = "plain",
                 test_path: str | Path | None = None, difficulty_field: str | None = None,
                 math_workers: int = 2, math_timeout_s: float = 5.0, **options):
        super().__init__(**options)
        if path is None:
            raise ValueError("the jsonl task needs path=<file.jsonl>")
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
        self.question_field, self.answer_field = question_field, answer_field
        self.answer_format, self.difficulty_field = answer_format, difficulty_field
        self.math_workers, self.math_timeout_s = math_workers, math_timeout_s
        self._pool = None
        self._splits = {split: [] for split in SPLITS}
        for problem in self._load(path):
            held_out = test_path is None and self.in_test_split(problem.question)
            self._splits["test" if held_out else "train"].append(problem)
        if test_path is not None:
            self._splits["test"] = self._load(test_path)

    def _load(self, path) -> list[Problem]:
        required = [self.question_field, self.answer_field] + ([self.difficulty_field] if self.difficulty_field else [])
        problems = []
        for lineno, record in read_jsonl(path, required):
            where = f"{path}:{lineno}"
            question = record[self.question_field]
            if not isinstance(question, str) or not question.strip():
                raise ValueError(f"{where}: field {self.question_field!r} must be a non-empty string")
            gold = extract_gold(record[self.answer_field], self.answer_format, where)
            meta = {"source": str(path), "line": lineno}
            if self.difficulty_field:
                meta["difficulty"] = record[self.difficulty_field]
            problems.append(self.make_problem(question, gold, meta))
        return problems

    def generate(self, n: int, seed: int, split: str = "train", difficulty=None) -> list[Problem]:
        """Up to `n` problems of `split` in a seeded order (the whole split when n exceeds it);
        `difficulty` (a value or list) keeps rows whose `difficulty_field` matches."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rows = self._splits[split]
        if difficulty is not None:
            if not self.difficulty_field:
                raise ValueError("difficulty filtering needs difficulty_field=<field name>")
            wanted = set(difficulty) if isinstance(difficulty, (list, tuple, set)) else {difficulty}
            rows = [p for p in rows if p.metadata["difficulty"] in wanted]
        order = list(range(len(rows)))
        random.Random(f"{self.name}|{split}|{seed}").shuffle(order)
        return [rows[i] for i in order[:n]]

    def check(self, problem: Problem, answer: str) -> float:
        if self.answer_format == "gsm8k":
            answer = answer.removeprefix("####").strip()
            answer = (b if (b := last_boxed(answer)) is not None else answer)
        return exact_or_numeric(answer, problem.answer)

    def check_many(self, problems, answers) -> list[tuple[float, bool]]:
        if self.answer_format != "boxed":
            return super().check_many(problems, answers)
        if self._pool is None:
            from qiusuo.rewards.math import MathVerifyPool

            self._pool = MathVerifyPool(num_workers=self.math_workers, timeout_s=self.math_timeout_s)
        return self._pool.verify_many([(f"${p.answer}$", a) for p, a in zip(problems, answers)])

    @property
    def num_timeouts(self) -> int:
        return self._pool.num_timeouts if self._pool is not None else 0

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
