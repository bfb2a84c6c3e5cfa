"""The task protocol: problems with ground truth, prompt templates, the held-out split, scoring.

A `Task` generates `Problem`s (the question, its answer, a prompt rendered in one of three
templates, and metadata such as difficulty) and scores completions into a `Score`. Subclasses
supply four things: `sample` (one random problem at a difficulty), `instruction` and
`compact_prompt` (how the question is asked), and `check` (is a parsed answer right).

Held-out split: every problem has a canonical key (its question); a keyed hash sends a fixed
`test_fraction` of the whole problem space to "test". `generate(split="train")` only ever
yields train-side problems and `split="test"` only test-side ones, so no seed and no amount of
training data can reach the evaluation problems (the miniature design excludes its eval set from
pretraining and RL, as a held-out set must be).

Pretraining corpus (`corpus`, `solution_mix`): each problem gets one worked completion in a
style drawn from a mix. Styles: "scratchpad" (the steps, right), "slip" (the steps with one
propagated mistake, so wrong), "direct" (no steps, the right answer) and "guess" (no steps, and
the answer of *another* random problem of the same shape: `guess`). The default mix blurts guesses:
a blurted answer in the corpus carries no information about the question, so a model that blurts
is right only as often as a guess is (for 3-digit addition 0.07%, the chance that two random sums
agree), however well it trains and on whatever machine. Only the scratchpad path can be learned,
and the headroom RL can take (choosing that path) is fixed by the data, not by pretraining luck.

Reward: TinyZero's rule for every task (https://github.com/Jiayi-Pan/TinyZero, its countdown reward): the accuracy when the
answer is right, else `format_score` (0.1) for a well-formed completion, else 0. The answer is
read only from a strictly well-formed completion, so formatting games earn nothing. Extra user
rewards (TRL signature) are added on top.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from qiusuo.rewards.format import THINK_OPEN, parse_completion

R1_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: {question} Assistant:"
)
CHAT_FORMAT_INSTRUCTION = (
    "Think it through inside <think> </think> tags, then give only the final answer inside "
    "<answer> </answer> tags."
)
TEMPLATES = ("r1", "compact", "chat")
SPLITS = ("train", "test")
# 60% blurted guesses, 40% scratchpads of which 30% slip: see the module docstring.
DEFAULT_MIX = {"guess": 0.6, "scratchpad": 0.28, "slip": 0.12}
BLURTS = ("guess", "direct")  # what a blurted (no-steps) trace answers: a guess, or the right answer


@dataclass
class Problem:
    """One verifiable problem. `prompt` is what the model is given (for template="chat" the user
    message text; render `messages` with the tokenizer's chat template instead)."""

    prompt: str
    question: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Score:
    reward: float
    format: float
    accuracy: float
    parsed_answer: str | None
    timed_out: bool = False
    refused: str | None = None  # the checker refused to run the answer (a sandbox that cannot confine it): why


class Checked(NamedTuple):
    """One `check_many` result. A refusal is scored 0 like a wrong answer, but it is the checker's
    failure, not the model's, so it travels with the score and GRPO counts it per step."""

    accuracy: float
    timed_out: bool = False
    refused: str | None = None


def r1_prompt(question: str) -> str:
    """The R1-Zero template (R1 paper Table 1) with the question in place of "prompt"."""
    text = question.strip()
    # The paper writes "User: prompt. Assistant:"; add the period unless the question has one.
    return R1_TEMPLATE.format(question=text if text[-1:] in ".?!" else text + ".")


class Task:
    """Base class of verifiable tasks; see the module docstring for the contract."""

    name: str = ""
    default_difficulty: int = 1
    difficulty_range: tuple[int, int] = (1, 1)  # inclusive bounds of the difficulty knob
    solution_styles: tuple[str, ...] = ()

    def __init__(self, template: str = "r1", format_score: float = 0.1, test_fraction: float = 0.1,
                 extra_rewards: Sequence[Callable[..., list[float]]] = (), think_in_prompt: bool = False):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        if not 0.0 <= format_score < 1.0:
            raise ValueError(f"format_score must be in [0, 1) so a right answer always beats a wrong "
                             f"one, got {format_score}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        if not all(callable(f) for f in extra_rewards):
            raise ValueError("extra_rewards must be callables f(completions, **columns) -> list[float]")
        self.template, self.format_score, self.test_fraction = template, format_score, test_fraction
        self.extra_rewards = tuple(extra_rewards)
        # For chat templates that open the think block in the generation prompt (R1-distill):
        # the completion then starts inside it, and scoring puts the tag back.
        self.think_in_prompt = think_in_prompt

    # --- subclass hooks -------------------------------------------------------------------
    def sample(self, rng: random.Random, difficulty: int) -> tuple[str, str, dict]:
        """One random problem: (question, answer, metadata)."""
        raise NotImplementedError

    def instruction(self, problem_question: str, metadata: dict) -> str:
        """The question as a sentence, for the r1 and chat templates."""
        return problem_question

    def compact_prompt(self, question: str, metadata: dict) -> str:
        """The question as the shortest prompt a tiny char-level model can read."""
        return question

    def split_key(self, question: str, metadata: dict) -> str:
        """Canonical identity of a problem for the held-out split (e.g. a+b == b+a)."""
        return question

    def check(self, problem: Problem, answer: str) -> float:
        """Accuracy in [0, 1] of a parsed answer."""
        raise NotImplementedError

    def check_many(self, problems: Sequence[Problem], answers: Sequence[str | None]) -> list[tuple[float, bool]]:
        """(accuracy, timed_out) per item; tasks with slow checkers override this to batch."""
        return [(self.check(p, a), False) if a is not None else (0.0, False) for p, a in zip(problems, answers)]

    def solution(self, problem: Problem, rng: random.Random, style: str) -> str:
        """A worked completion in `style` (one of `solution_styles`) for pretraining data."""
        raise NotImplementedError(f"task {self.name!r} provides no worked solutions")

    def guess_source(self, problem: Problem, rng: random.Random) -> tuple[str, str, dict]:
        """Another random problem of the same shape as `problem` (its difficulty): what a guess answers.
        Drawn from `rng` alone, never from `problem`'s operands."""
        return self.sample(rng, problem.metadata.get("difficulty", self.default_difficulty))

    def guess(self, problem: Problem, rng: random.Random) -> str:
        """The "guess" style: a blurted completion (the "direct" style's shape) whose answer is that of
        another random problem of the same shape. It is right exactly as often as two random problems
        share an answer, whatever model learns it: a blurt in the corpus tells nothing about its question."""
        question, answer, meta = self.guess_source(problem, rng)
        other = self.make_problem(question, answer, {**problem.metadata, **meta})
        return self.solution(other, rng, "direct")

    @property
    def corpus_styles(self) -> tuple[str, ...]:
        """The styles `corpus` can draw: the task's own, plus "guess" wherever it has "direct"."""
        extra = ("guess",) if "direct" in self.solution_styles and "guess" not in self.solution_styles else ()
        return self.solution_styles + extra

    def solution_mix(self, p_direct: float, p_slip: float, blurt: str = "guess") -> dict[str, float]:
        """The pretraining mix: a share `p_direct` of blurted traces (`blurt`: "guess" or "direct"), the rest
        scratchpads of which a share `p_slip` slip; styles the task lacks and zero weights are left out."""
        if blurt not in BLURTS:
            raise ValueError(f"blurt must be one of {BLURTS}, got {blurt!r}")
        mix = {blurt: p_direct, "scratchpad": (1 - p_direct) * (1 - p_slip), "slip": (1 - p_direct) * p_slip}
        return {k: v for k, v in mix.items() if k in self.corpus_styles and v > 0}

    # --- problems -------------------------------------------------------------------------
    def in_test_split(self, key: str) -> bool:
        digest = hashlib.sha256(f"{self.name}|{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.test_fraction

    def _levels(self, difficulty: int | Sequence[int] | None) -> list[int]:
        levels = [self.default_difficulty] if difficulty is None else (
            [difficulty] if isinstance(difficulty, int) else list(difficulty))
        lo, hi = self.difficulty_range
        for d in levels:
            if not isinstance(d, int) or not lo <= d <= hi:
                raise ValueError(f"task {self.name!r}: difficulty must be an int in [{lo}, {hi}], got {d!r}")
        if not levels:
            raise ValueError("difficulty must be an int, a non-empty list of ints, or None")
        return levels

    def make_problem(self, question: str, answer: str, metadata: dict) -> Problem:
        instruction = self.instruction(question, metadata)
        chat_text = f"{instruction}\n{CHAT_FORMAT_INSTRUCTION}"
        prompt = {"r1": r1_prompt(instruction), "compact": self.compact_prompt(question, metadata),
                  "chat": chat_text}[self.template]
        if self.think_in_prompt and self.template != "chat":
            prompt += THINK_OPEN
        return Problem(prompt=prompt, question=question, answer=answer, metadata=metadata,
                       messages=[{"role": "user", "content": chat_text}])

    def generate(self, n: int, seed: int, split: str = "train",
                 difficulty: int | Sequence[int] | None = None) -> list[Problem]:
        """`n` problems of `split`; the same arguments always give the same problems. A list of
        difficulties draws each problem's level uniformly from it (a curriculum mix)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        levels = self._levels(difficulty)
        rng = random.Random(f"{self.name}|{split}|{seed}")
        want_test, problems, tries = split == "test", [], 0
        while len(problems) < n:
            tries += 1
            if tries > 1000 * n + 10_000:
                raise ValueError(f"task {self.name!r}: could not draw {n} {split} problems at difficulty "
                                 f"{levels}; the problem space is too small for the split")
            level = rng.choice(levels)
            question, answer, meta = self.sample(rng, level)
            if self.in_test_split(self.split_key(question, meta)) == want_test:
                problems.append(self.make_problem(question, answer, {"difficulty": level, **meta}))
        return problems

    def corpus(self, n: int, seed: int, mix: dict[str, float] | None = None,
               difficulty: int | Sequence[int] | None = None) -> list[tuple[Problem, str]]:
        """`n` train-split problems, each with a worked completion whose style is drawn from `mix`."""
        return [(p, c) for p, _, c in self.styled_corpus(n, seed, mix, difficulty)]

    def styled_corpus(self, n: int, seed: int, mix: dict[str, float] | None = None,
                      difficulty: int | Sequence[int] | None = None) -> list[tuple[Problem, str, str]]:
        """`corpus` with each completion's style: (problem, style, completion) triples."""
        mix = dict(DEFAULT_MIX if mix is None else mix)
        unknown = set(mix) - set(self.corpus_styles)
        if unknown or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"mix must map styles from {self.corpus_styles} to non-negative weights "
                             f"with a positive sum; got {mix}")
        problems = self.generate(n, seed, "train", difficulty)
        rng = random.Random(f"{self.name}|corpus|{seed}")
        styles, weights = list(mix), list(mix.values())
        out = []
        for p in problems:
            style = rng.choices(styles, weights)[0]
            out.append((p, style, self.guess(p, rng) if style == "guess" and "guess" not in self.solution_styles
                        else self.solution(p, rng, style)))
        return out

    # --- scoring --------------------------------------------------------------------------
    def score(self, problem: Problem, completion: str) -> Score:
        return self.score_many([problem], [completion])[0]

    def score_many(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[Score]:
        if len(problems) != len(completions):
            raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
        texts = [THINK_OPEN + c if self.think_in_prompt else c for c in completions]
        parsed = [parse_completion(t) for t in texts]
        answers = [p.answer if p is not None else None for p in parsed]
        checked = self.check_many(problems, answers)
        extras = self._extra_rewards(problems, completions)
        scores = []
        for p, answer, check, extra in zip(parsed, answers, checked, extras):
            accuracy, timed_out, refused = Checked(*check)  # (accuracy, timed_out) pairs are Checked too
            fmt = 1.0 if p is not None else 0.0
            reward = max(accuracy, self.format_score * fmt) + extra
            scores.append(Score(reward=reward, format=fmt, accuracy=accuracy, parsed_answer=answer,
                                timed_out=timed_out, refused=refused))
        return scores

    def _extra_rewards(self, problems: Sequence[Problem], completions: Sequence[str]) -> list[float]:
        total = [0.0] * len(completions)
        if not self.extra_rewards:
            return total
        columns = {"answer": [p.answer for p in problems], "question": [p.question for p in problems],
                   "prompts": [p.prompt for p in problems], "metadata": [p.metadata for p in problems]}
        for fn in self.extra_rewards:
            values = fn(list(completions), **columns)
            if len(values) != len(completions):
                raise ValueError(f"extra reward {getattr(fn, '__name__', fn)!r} returned {len(values)} "
                                 f"values for {len(completions)} completions")
            total = [t + (float(v) if v is not None else 0.0) for t, v in zip(total, values)]
        return total

    def reward_function(self) -> Callable[..., list[float]]:
        """This task's reward with TRL's signature `f(completions, answer, **columns)`: the gold
        answers in `answer`, metadata fields (e.g. Countdown's `numbers` and `target`) as columns."""
        from qiusuo.rewards.format import completion_text

        def reward(completions, answer, **columns) -> list[float]:
            n = len(completions)
            meta_columns = {k: v for k, v in columns.items() if isinstance(v, list) and len(v) == n}
            questions = meta_columns.get("question", [""] * n)
            problems = [Problem(prompt="", question=str(questions[i]), answer=str(answer[i]),
                                metadata={k: v[i] for k, v in meta_columns.items()}) for i in range(n)]
            return [s.reward for s in self.score_many(problems, [completion_text(c) for c in completions])]

        reward.__name__ = f"{self.name}_reward"
        return reward

    def close(self) -> None:
        """Release worker processes, if the task holds any."""
