"""Split a completion into reasoning (inside <think>...</think>) and answer, whole or streamed.

R1-style templates may put `<think>` in the prompt, so a completion with `</think>` but no
`<think>` is reasoning up to the closing tag. `<answer>` tags around the answer are dropped.
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"


def split_reasoning(text: str) -> tuple[str, str]:
    """text -> (reasoning, answer); reasoning is '' when the text has no think block."""
    if THINK_CLOSE not in text:
        if THINK_OPEN in text:  # still thinking (cut off by max_tokens)
            before, _, reasoning = text.partition(THINK_OPEN)
            return reasoning.strip(), before.strip()
        return "", _strip_answer(text)
    head, _, answer = text.partition(THINK_CLOSE)
    reasoning = head.split(THINK_OPEN, 1)[1] if THINK_OPEN in head else head
    return reasoning.strip(), _strip_answer(answer)


def _strip_answer(text: str) -> str:
    return text.replace(ANSWER_OPEN, "").replace(ANSWER_CLOSE, "").strip()


class ReasoningStream:
    """Feed text deltas; get back (kind, text) pieces, kind 'think' or 'answer'.

    A tag split across deltas is held back until it is complete (or proven not to be a tag).
    """

    def __init__(self, thinking: bool = False):
        self.thinking = thinking
        self._buffer = ""

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self._buffer += delta
        pieces: list[tuple[str, str]] = []
        while self._buffer:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            i = self._buffer.find(tag)
            if i >= 0:
                self._emit(pieces, self._buffer[:i])
                self._buffer = self._buffer[i + len(tag):]
                self.thinking = not self.thinking
                continue
            tags = (tag,) if self.thinking else (tag, ANSWER_OPEN, ANSWER_CLOSE)
            keep = max(_partial_tag_suffix(self._buffer, t) for t in tags)
            self._emit(pieces, self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            break
        return pieces

    def flush(self) -> list[tuple[str, str]]:
        pieces: list[tuple[str, str]] = []
        self._emit(pieces, self._buffer)
        self._buffer = ""
        return pieces

    def _emit(self, pieces: list[tuple[str, str]], text: str) -> None:
        if not self.thinking:
            text = text.replace(ANSWER_OPEN, "").replace(ANSWER_CLOSE, "")
        if text:
            pieces.append(("think" if self.thinking else "answer", text))


def _partial_tag_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
