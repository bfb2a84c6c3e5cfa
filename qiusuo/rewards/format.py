"""The strict R1 format: `<think>…</think><answer>…</answer>` and nothing else.

The format reward is 1.0 only when the completion is exactly one think block followed by exactly
one answer block, separated and surrounded by nothing but whitespace. Repeated tags, tags nested
inside a block, an answer hidden inside the think block, or text after `</answer>` all earn 0 and
yield no parsed answer: a policy must never gain reward by emitting several answers and hoping
one matches (Logic-RL, arXiv 2502.14768, uses the same "exactly one of each, in order" rule).

Parsing is a linear scan with `str.count`/`str.find`, not a backtracking regex, so a
megabyte-long completion costs microseconds.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


@dataclass(frozen=True)
class ParsedCompletion:
    """The two blocks of a well-formed completion; `answer` is stripped of surrounding space."""

    think: str
    answer: str


def parse_completion(completion: str) -> ParsedCompletion | None:
    """Split a completion into its think and answer blocks, or None if it is not well formed."""
    if not isinstance(completion, str):
        return None
    # Exactly one of each tag: this alone rules out repeated and nested blocks.
    if any(completion.count(tag) != 1 for tag in TAGS):
        return None
    i_open, i_close = completion.find(THINK_OPEN), completion.find(THINK_CLOSE)
    a_open, a_close = completion.find(ANSWER_OPEN), completion.find(ANSWER_CLOSE)
    if not (i_open < i_close < a_open < a_close):
        return None
    outside = (
        completion[:i_open],
        completion[i_close + len(THINK_CLOSE) : a_open],
        completion[a_close + len(ANSWER_CLOSE) :],
    )
    if any(part.strip() for part in outside):
        return None
    think = completion[i_open + len(THINK_OPEN) : i_close]
    answer = completion[a_open + len(ANSWER_OPEN) : a_close]
    return ParsedCompletion(think=think, answer=answer.strip())


def format_reward(completion: str) -> float:
    """1.0 for a strictly well-formed completion, else 0.0."""
    return 1.0 if parse_completion(completion) is not None else 0.0


def extract_answer(completion: str) -> str | None:
    """The answer block of a well-formed completion (stripped), else None."""
    parsed = parse_completion(completion)
    return parsed.answer if parsed is not None else None


def completion_text(completion) -> str:
    """A completion as text: TRL passes either strings or, for conversational data, a list of
    messages whose last one is the assistant turn."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise TypeError(
        f"a completion must be a string or a list of chat messages, got {type(completion).__name__}"
    )
