"""The one reasoning module: where a sample's think block is, decided on the think-tag token ids.

Everything that splits or counts reasoning goes through `ThinkState`: the server (`reasoning_content`
vs `content`, usage `reasoning_tokens`, the metrics), `qiusuo generate` / `qiusuo chat` (streamed),
`qiusuo eval` (think tokens, empty think blocks) and the thinking budget (a logits processor). So
the four agree token for token.

The rules follow DeepSeek-R1's reasoning parser in vLLM and fix the bugs its users hit:

- The state is decided by the `<think>` / `</think>` *ids*, never by text, so a literal "<think>"
  spelled out of ordinary byte tokens stays text (vLLM #15758).
- A prompt that ends inside an open think block (a chat template that appends `<think>`, as
  DeepSeek-R1's does) starts the output inside it: everything before the model's `</think>` is
  reasoning, although the output never says `<think>` (vLLM #12999).
- A `</think>` outside any block is a tag all the same: it never reaches `content`. What came
  before it stays content (a stream has already sent it, and a whole response must read the same
  as its stream).
- A multi-token delta holding a tag and text on both sides comes back as separate segments, so a
  streamed delta never mixes reasoning and content (vLLM #43933, #55195).

How the splitter maps ids to characters: the engine's cumulative `text` is sliced, never
re-decoded. Per token it only compares ids; where a tag switches the state it decodes the output
up to the tag once to learn the tag's character span (the engine's incremental decoder emits
exactly `decode(ids)`). The engine's `text` may hold back characters that could still become a
stop string (and is truncated at one); a tag cut in half by that waits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch

from .outputs import CompletionOutput
from .sampling_params import SamplingParams

REASONING, CONTENT = "reasoning", "content"


def think_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """(`<think>` id, `</think>` id) of a tokenizer; None where it has no such token."""
    return getattr(tokenizer, "think_start_id", None), getattr(tokenizer, "think_end_id", None)


def prompt_opens_think(prompt_ids: Sequence[int], start_id: int | None, end_id: int | None) -> bool:
    """True when the prompt ends inside a think block (a template that appends `<think>`, maybe + '\\n')."""
    if start_id is None:
        return False
    for tid in reversed(prompt_ids):
        if tid == end_id:
            return False
        if tid == start_id:
            return True
    return False


class ThinkState:
    """The think-block state machine over output ids: one `step` per generated token.

    `step` says whether the token is a tag (a state switch, or a stray `</think>`): tags are neither
    reasoning nor content. Inside a block a second `<think>` is ordinary reasoning text.
    """

    __slots__ = ("start_id", "end_id", "inside", "saw_block", "closed", "num_reasoning_tokens")

    def __init__(self, start_id: int | None, end_id: int | None, inside: bool = False):
        self.start_id, self.end_id = start_id, end_id
        self.inside = inside  # state after the last token seen
        self.saw_block = inside  # the output has a reasoning part (possibly empty)
        self.closed = False  # some block was closed by `</think>`
        self.num_reasoning_tokens = 0  # tokens inside think blocks, the tags excluded

    @classmethod
    def for_prompt(cls, tokenizer: Any, prompt_ids: Sequence[int]) -> "ThinkState":
        start, end = think_ids(tokenizer)
        return cls(start, end, prompt_opens_think(prompt_ids, start, end))

    def step(self, tid: int) -> bool:
        if tid == self.end_id and self.end_id is not None:
            self.closed = self.closed or self.inside
            self.inside, self.saw_block = False, True
            return True
        if tid == self.start_id and self.start_id is not None and not self.inside:
            self.inside = self.saw_block = True
            return True
        if self.inside:
            self.num_reasoning_tokens += 1
        return False

    def scan(self, token_ids: Sequence[int]) -> "ThinkState":
        for tid in token_ids:
            self.step(tid)
        return self


def count_reasoning(tokenizer: Any, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> int:
    """Output tokens inside think blocks (tags excluded): usage `reasoning_tokens`, eval's think tokens."""
    return ThinkState.for_prompt(tokenizer, prompt_ids).scan(token_ids).num_reasoning_tokens


class ReasoningSplitter:
    """One sample: feed it the engine's `CompletionOutput`s in order, get (kind, text) segments back."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.state = ThinkState.for_prompt(tokenizer, prompt_ids)
        self.opened_by_prompt = self.state.inside
        self.num_tokens = 0  # output tokens consumed
        self._cuts: list[tuple[int, int, bool]] = []  # (tag's first char, past its last char, reasoning after)
        self._next_cut = 0
        self._emitted = 0  # characters of the engine's text handed out
        self._emit_state = self.state.inside  # state at character `_emitted`

    in_reasoning = property(lambda self: self.state.inside)
    has_reasoning = property(lambda self: self.state.saw_block)
    num_reasoning_tokens = property(lambda self: self.state.num_reasoning_tokens)

    def feed(self, out: CompletionOutput) -> list[tuple[str, str]]:
        """Consume the sample's new tokens; return the newly visible text as (kind, text) segments."""
        ids = out.token_ids
        # The engine does not decode a stop token (eos or a stop_token_id); it is never a tag here.
        stop_token_last = out.finish_reason == "stop" and not isinstance(out.stop_reason, str)
        end = len(ids) - 1 if stop_token_last else len(ids)
        for i in range(self.num_tokens, end):
            if self.state.step(ids[i]):
                self._tag(ids, i)
        self.num_tokens = len(ids)
        return self._take(out.text)

    def _tag(self, ids: Sequence[int], i: int) -> None:
        decode = self.tokenizer.decode
        begin = len(decode(ids[:i], skip_special_tokens=self.skip_special_tokens))
        end = len(decode(ids[:i + 1], skip_special_tokens=self.skip_special_tokens))
        self._cuts.append((begin, end, self.state.inside))

    def _take(self, text: str) -> list[tuple[str, str]]:
        """Segments of characters [emitted, len(text)), tags dropped; a tag cut mid-way waits."""
        visible = len(text)
        segments: list[tuple[str, str]] = []
        pos = self._emitted
        while self._next_cut < len(self._cuts):
            begin, end, state_after = self._cuts[self._next_cut]
            if begin >= visible:
                break
            if pos < begin:
                segments.append((REASONING if self._emit_state else CONTENT, text[pos:begin]))
                pos = begin
            if end > visible:  # the tag is only partly visible: hold it (and what follows) back
                visible = pos
                break
            pos = max(pos, end)
            self._emit_state = state_after
            self._next_cut += 1
        if pos < visible:
            segments.append((REASONING if self._emit_state else CONTENT, text[pos:visible]))
            pos = visible
        self._emitted = pos
        return _merge(segments)


def _merge(segments: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Join neighbours of the same kind and drop empty pieces (a think block with nothing inside)."""
    merged: list[tuple[str, str]] = []
    for kind, text in segments:
        if not text:
            continue
        if merged and merged[-1][0] == kind:
            merged[-1] = (kind, merged[-1][1] + text)
        else:
            merged.append((kind, text))
    return merged


def split_final(tokenizer: Any, prompt_ids: Sequence[int], out: CompletionOutput,
                skip_special_tokens: bool = True) -> tuple[str | None, str, int]:
    """A finished sample -> (reasoning or None when there was no think block, content, reasoning tokens)."""
    splitter = ReasoningSplitter(tokenizer, prompt_ids, skip_special_tokens)
    segments = splitter.feed(out)
    reasoning = "".join(t for k, t in segments if k == REASONING)
    content = "".join(t for k, t in segments if k == CONTENT)
    return (reasoning if splitter.has_reasoning else None), content, splitter.num_reasoning_tokens


def strip_answer_tags(text: str) -> str:
    """The answer without the `<answer>` / `</answer>` tags the built-in tasks wrap it in (for display)."""
    return text.replace("<answer>", "").replace("</answer>", "")


# ---------------------------------------------------------------------- thinking budget
# `reasoning_effort` (OpenAI's field; Ollama's `think` levels) -> thinking budget in reasoning tokens.
# "none" closes the think block at once; the others are DeepSeek-R1's typical chain lengths: most
# of its MATH-500 answers think for under 4k tokens, AIME ones for 8-16k.
REASONING_EFFORT_BUDGETS = {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": 16384}
# Tokens kept for the answer when max_tokens would end a sample inside its think block:
# min(ANSWER_RESERVE_TOKENS, max_tokens // 4); the server's `answer_reserve_tokens` overrides the first.
ANSWER_RESERVE_TOKENS = 256


def answer_reserve(max_tokens: int | None, reserve: int = ANSWER_RESERVE_TOKENS) -> int:
    """The answer tokens kept out of `max_tokens` (0: none; the block is never closed early)."""
    return 0 if max_tokens is None else max(0, min(reserve, max_tokens // 4))


class ThinkingBudget:
    """Closes a sample's think block: its next token inside one is `</think>` once the sample has
    `budget` reasoning tokens, or once its output is `close_at` tokens long (max_tokens minus the
    answer reserve minus the tag: the answer then still gets the reserve).

    A per-request logits processor (`SamplingParams.logits_processors`, vLLM's hook): while the sample
    is inside a think block and a limit is reached (reasoning counted as `ThinkState` counts it, so
    the budget is usage's `reasoning_tokens`), every logit but `</think>`'s is masked.
    Greedy, seeded sampling and logprobs all see the forced token (logprob 0, the others -inf; the
    server clamps those for JSON). Stateless — it reads the state off the output ids each step — so
    the n samples of a request can share it, and preemption and recomputation change nothing. It
    scans the ids only once the output is long enough for a limit to bite (reasoning tokens never
    outnumber output tokens), so most steps cost one comparison.
    """

    def __init__(self, budget: int | None, start_id: int, end_id: int, opened_by_prompt: bool = False,
                 close_at: int | None = None):
        if budget is not None and budget < 0:
            raise ValueError(f"thinking_budget={budget}: must be >= 0 (0 closes the think block at once)")
        if close_at is not None and close_at < 0:
            raise ValueError(f"close_at={close_at}: must be >= 0")
        self.budget, self.start_id, self.end_id = budget, start_id, end_id
        self.opened_by_prompt = opened_by_prompt  # the chat template already wrote `<think>`
        self.close_at = close_at
        limits = [x for x in (budget, close_at) if x is not None]
        self._first_possible = min(limits) if limits else None  # output length before which nothing is forced

    def num_reasoning_tokens(self, output_ids: Sequence[int]) -> int | None:
        """Reasoning tokens written so far, or None when the sample is not inside a think block."""
        state = ThinkState(self.start_id, self.end_id, self.opened_by_prompt).scan(output_ids)
        return state.num_reasoning_tokens if state.inside else None

    def _forces(self, num_out: int, num_reasoning: int) -> bool:
        """Inside a block, with `num_out` output tokens of which `num_reasoning` reasoning: force `</think>`?"""
        return ((self.budget is not None and num_reasoning >= self.budget)
                or (self.close_at is not None and num_out >= self.close_at))

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self._first_possible is None or len(output_ids) < self._first_possible:
            return logits
        n = self.num_reasoning_tokens(output_ids)
        if n is None or not self._forces(len(output_ids), n):
            return logits
        forced = torch.full_like(logits, float("-inf"))  # (V,)
        forced[self.end_id] = 0.0
        return forced

    def cut(self, output_ids: Sequence[int], finish_reason: str | None) -> bool:
        """Was this sample's reasoning cut short: a `</think>` this processor forced, or an output that
        ended (max_tokens, the context) inside a think block? What `reasoning_truncated` reports."""
        state = ThinkState(self.start_id, self.end_id, self.opened_by_prompt)
        for i, tid in enumerate(output_ids):
            if tid == self.end_id and state.inside and self._forces(i, state.num_reasoning_tokens):
                return True
            state.step(tid)
        return state.inside and finish_reason == "length"


def thinking_limit(tokenizer: Any, budget: int | None, max_tokens: int | None = None, reserve: int = 0,
                   opened_by_prompt: bool = False) -> ThinkingBudget | None:
    """The `ThinkingBudget` for a request: `budget` reasoning tokens, and a block still open when only
    `reserve` answer tokens (and the tag) are left of `max_tokens` is closed. None when the tokenizer
    has no think tags or there is nothing to enforce."""
    start_id, end_id = think_ids(tokenizer)
    close_at = max_tokens - reserve - 1 if max_tokens is not None and reserve > 0 else None
    if start_id is None or end_id is None or (budget is None and close_at is None):
        return None
    return ThinkingBudget(budget, start_id, end_id, opened_by_prompt, close_at=max(close_at, 0)
                          if close_at is not None else None)


def with_thinking_budget(params: SamplingParams, budget: int | None, tokenizer: Any,
                         opened_by_prompt: bool = False, reserve: int = 0) -> SamplingParams:
    """`params` plus a `ThinkingBudget` processor (see `thinking_limit`) when there is one to enforce."""
    proc = thinking_limit(tokenizer, budget, params.max_tokens, reserve, opened_by_prompt)
    if proc is None:
        return params
    return dataclasses.replace(params, logits_processors=[*params.logits_processors, proc])


__all__ = ["REASONING", "CONTENT", "REASONING_EFFORT_BUDGETS", "ANSWER_RESERVE_TOKENS", "ThinkState",
           "ReasoningSplitter", "ThinkingBudget", "answer_reserve", "count_reasoning", "prompt_opens_think",
           "split_final", "strip_answer_tags", "think_ids", "thinking_limit", "with_thinking_budget"]
