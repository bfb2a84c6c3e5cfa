"""Splitting one sample's output into `reasoning` and `content`, decided on the think-tag token ids.

The split follows vLLM's token-id parser and fixes the bugs its users hit (reference/serving.md
§1b, §3): the state is decided by the `<think>` / `</think>` *ids*, never by text, so the literal
"<think>" spelled out of ordinary byte tokens stays text (vLLM #15758); a prompt whose chat
template already opened a think block starts inside it, so a model that emits only `</think>`
still gets its reasoning separated (vLLM #12999); and a multi-token delta that holds a tag and
text on both sides comes back as separate segments, so a streamed delta never mixes the two
(vLLM #43933, #55195).

How: the engine's cumulative `text` is sliced, never re-decoded. Per token the splitter only
compares ids; where a tag id switches the state, it decodes the output up to the tag once to learn
the tag's character span in that text (the engine's incremental decoder emits exactly
`decode(ids)`, see `IncrementalDecoder`). The engine's `text` may hold back characters that could
still become a stop string (and is truncated at one); a tag cut in half by that waits.
"""

from __future__ import annotations

from typing import Any, Sequence

from qiusuo.engine import CompletionOutput

REASONING, CONTENT = "reasoning", "content"


def prompt_opens_think(prompt_ids: Sequence[int], start_id: int | None, end_id: int | None) -> bool:
    """True when the prompt ends inside a think block (a template that appends `<think>`)."""
    if start_id is None:
        return False
    for tid in reversed(prompt_ids):
        if tid == end_id:
            return False
        if tid == start_id:
            return True
    return False


def count_reasoning(tokenizer: Any, prompt_ids: Sequence[int], token_ids: Sequence[int]) -> int:
    """Output tokens inside think blocks (tags excluded), as `ReasoningSplitter` counts them."""
    start, end = getattr(tokenizer, "think_start_id", None), getattr(tokenizer, "think_end_id", None)
    inside, count = prompt_opens_think(prompt_ids, start, end), 0
    for tid in token_ids:
        if not inside and tid == start:
            inside = True
        elif inside and tid == end:
            inside = False
        elif inside:
            count += 1
    return count


class ReasoningSplitter:
    """One sample: feed it the engine's `CompletionOutput`s in order, get (kind, text) segments back."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.start_id = tokenizer.think_start_id
        self.end_id = tokenizer.think_end_id
        self.opened_by_prompt = prompt_opens_think(prompt_ids, self.start_id, self.end_id)
        self.in_reasoning = self.opened_by_prompt  # state after the last token seen
        self.saw_think = self.opened_by_prompt  # whether the output has a reasoning part at all
        self.num_tokens = 0  # output tokens consumed
        self.num_reasoning_tokens = 0  # tokens inside think blocks, the tags excluded
        self._cuts: list[tuple[int, int, bool]] = []  # (tag's first char, past its last char, reasoning after)
        self._next_cut = 0
        self._emitted = 0  # characters of the engine's text handed out
        self._emit_state = self.in_reasoning  # state at character `_emitted`

    def feed(self, out: CompletionOutput) -> list[tuple[str, str]]:
        """Consume the sample's new tokens; return the newly visible text as (kind, text) segments."""
        ids = out.token_ids
        # The engine does not decode a stop token (eos or a stop_token_id); it is never a tag here.
        stop_token_last = out.finish_reason == "stop" and not isinstance(out.stop_reason, str)
        end = len(ids) - 1 if stop_token_last else len(ids)
        start_id, end_id = self.start_id, self.end_id
        for i in range(self.num_tokens, end):
            tid = ids[i]
            if (tid == start_id and not self.in_reasoning) or (tid == end_id and self.in_reasoning):
                self._tag(ids, i)
            elif self.in_reasoning:
                self.num_reasoning_tokens += 1
        self.num_tokens = len(ids)
        return self._take(out.text)

    def _tag(self, ids: Sequence[int], i: int) -> None:
        decode = self.tokenizer.decode
        begin = len(decode(ids[:i], skip_special_tokens=self.skip_special_tokens))
        end = len(decode(ids[:i + 1], skip_special_tokens=self.skip_special_tokens))
        self.in_reasoning = not self.in_reasoning
        self.saw_think = True
        self._cuts.append((begin, end, self.in_reasoning))

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
        return _merge(segments) if len(segments) > 1 else [s for s in segments if s[1]]

    @property
    def has_reasoning(self) -> bool:
        return self.saw_think


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
