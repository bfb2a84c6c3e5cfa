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
class ThinkingBudget:
    """Once a sample has `budget` reasoning tokens, its next token inside a think block is `</think>`.

    A per-request logits processor (`SamplingParams.logits_processors`, vLLM's hook): while the sample
    is inside a think block with `budget` reasoning tokens already written (counted as `ThinkState`
    counts them, so the budget is usage's `reasoning_tokens`), every logit but `</think>`'s is masked.
    Greedy, seeded sampling and logprobs all see the forced token (logprob 0, the others -inf; the
    server clamps those for JSON). Stateless — it reads the state off the output ids each step — so
    the n samples of a request can share it, and preemption and recomputation change nothing.
    """

    def __init__(self, budget: int, start_id: int, end_id: int, opened_by_prompt: bool = False):
        if budget < 0:
            raise ValueError(f"thinking_budget={budget}: must be >= 0 (0 closes the think block at once)")
        self.budget, self.start_id, self.end_id = budget, start_id, end_id
        self.opened_by_prompt = opened_by_prompt  # the chat template already wrote `<think>`

    def num_reasoning_tokens(self, output_ids: Sequence[int]) -> int | None:
        """Reasoning tokens written so far, or None when the sample is not inside a think block."""
        state = ThinkState(self.start_id, self.end_id, self.opened_by_prompt).scan(output_ids)
        return state.num_reasoning_tokens if state.inside else None

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        n = self.num_reasoning_tokens(output_ids)
        if n is None or n < self.budget:
            return logits
        forced = torch.full_like(logits, float("-inf"))  # (V,)
        forced[self.end_id] = 0.0
        return forced


def with_thinking_budget(params: SamplingParams, budget: int | None, tokenizer: Any,
                         opened_by_prompt: bool = False) -> SamplingParams:
    """`params` plus a `ThinkingBudget` processor when a budget is set and the tokenizer has think tags."""
    start_id, end_id = think_ids(tokenizer)
    if budget is None or start_id is None or end_id is None:
        return params
    proc = ThinkingBudget(budget, start_id, end_id, opened_by_prompt)
    return dataclasses.replace(params, logits_processors=[*params.logits_processors, proc])


__all__ = ["REASONING", "CONTENT", "ThinkState", "ReasoningSplitter", "ThinkingBudget", "count_reasoning",
           "prompt_opens_think", "split_final", "strip_answer_tags", "think_ids", "with_thinking_budget"]
