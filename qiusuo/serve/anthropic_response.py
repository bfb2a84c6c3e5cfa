"""The chat route's answer as Anthropic's: a finished `chat.completion` body -> a `message`
(`message_body`), its SSE chunks -> Anthropic's stream events (`StreamTranslator`, `stream_events`:
message_start, content_block_start/delta/stop, message_delta, message_stop; field names from
docs.anthropic.com, "Messages" and "Streaming Messages").

Reasoning becomes `thinking` blocks (empty with `display: "omitted"`; a `signature` that is the
SHA-256 of the text: opaque, never checked), tool calls `tool_use` blocks with `toolu_` ids
(`input_json_delta` when streamed), finish reasons Anthropic's stop reasons; an engine failure
mid-stream is an `error` event.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, AsyncIterator

from .chat import ChatRun, chat_stream
from .errors import anthropic_error_body
from .serving import ServerState

_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


def tool_use_id(call_id: str | None) -> str | None:
    """The chat route's `call_<hex>` as Anthropic spells a tool_use id, `toolu_<hex>`."""
    return "toolu_" + call_id[len("call_"):] if call_id and call_id.startswith("call_") else call_id


def signature(thinking: str) -> str:
    return hashlib.sha256(thinking.encode()).hexdigest()


def _stop(finish: str | None, matched: Any) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) for the chat route's finish_reason and matched stop."""
    if finish == "stop" and isinstance(matched, str):
        return "stop_sequence", matched
    return _STOP_REASONS.get(finish or "stop", "end_turn"), None


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    details = usage.get("completion_tokens_details") or {}
    out = {"input_tokens": usage["prompt_tokens"] - cached, "output_tokens": usage["completion_tokens"],
           "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
           "output_tokens_details": {"thinking_tokens": details.get("reasoning_tokens", 0)}}
    if "reasoning_truncated" in details:
        out["reasoning_truncated"] = details["reasoning_truncated"]  # ours: see chat.py
    return out


def message_body(response: dict[str, Any], model: str, message_id: str, display: str = "full") -> dict[str, Any]:
    """A finished `chat.completion` body -> Anthropic's `message`."""
    choice = response["choices"][0]
    m = choice["message"]
    content: list[dict[str, Any]] = []
    if m.get("reasoning_content") is not None and display != "none":
        thinking = m["reasoning_content"]
        content.append({"type": "thinking", "thinking": "" if display == "omitted" else thinking,
                        "signature": signature(thinking)})
    if m.get("content"):
        content.append({"type": "text", "text": m["content"]})
    for call in m.get("tool_calls") or []:
        content.append({"type": "tool_use", "id": tool_use_id(call["id"]), "name": call["function"]["name"],
                        "input": json.loads(call["function"]["arguments"] or "{}")})
    reason, sequence = _stop(choice["finish_reason"], choice.get("stop_reason"))
    return {"id": message_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": _usage(response["usage"])}


def _event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class StreamTranslator:
    """The chat route's chunks (dicts, in order) -> Anthropic's stream events (SSE strings).

    One content block is open at a time; a change of kind (thinking, text, a tool call) closes it
    and opens the next, so the indices count up as Anthropic's do. Pure: fed dicts, it can be
    tested without an engine."""

    def __init__(self, model: str, message_id: str, input_tokens: int, display: str = "full"):
        self.model, self.message_id, self.display = model, message_id, display
        self.input_tokens = input_tokens
        self.index = -1
        self.open: str | None = None  # "thinking", "text" or "tool_use:<n>"
        self.thinking = ""  # the open thinking block's text, for its signature
        self.finish: str | None = None

    def start(self) -> str:
        message = {"id": self.message_id, "type": "message", "role": "assistant", "model": self.model,
                   "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}
        return _event("message_start", {"message": message})

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":
            events.append(_event("content_block_delta", {"index": self.index, "delta": {
                "type": "signature_delta", "signature": signature(self.thinking)}}))
        events.append(_event("content_block_stop", {"index": self.index}))
        self.open = None
        return events

    def _open(self, kind: str, block: dict[str, Any]) -> list[str]:
        events = self._close()
        self.index += 1
        self.open, self.thinking = kind, ""
        return events + [_event("content_block_start", {"index": self.index, "content_block": block})]

    def feed(self, chunk: dict[str, Any]) -> list[str]:
        events: list[str] = []
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            thinking = delta.get("reasoning_content")
            if thinking is not None and self.display != "none":
                if self.open != "thinking":
                    events += self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
                self.thinking += thinking
                if thinking and self.display == "full":
                    events.append(_event("content_block_delta", {"index": self.index, "delta": {
                        "type": "thinking_delta", "thinking": thinking}}))
            if delta.get("content"):
                if self.open != "text":
                    events += self._open("text", {"type": "text", "text": ""})
                events.append(_event("content_block_delta", {"index": self.index, "delta": {
                    "type": "text_delta", "text": delta["content"]}}))
            for call in delta.get("tool_calls") or []:
                key = f"tool_use:{call.get('index', 0)}"
                fn = call.get("function") or {}
                if self.open != key:
                    events += self._open(key, {"type": "tool_use", "id": tool_use_id(call.get("id")),
                                               "name": fn.get("name"), "input": {}})
                if fn.get("arguments"):
                    events.append(_event("content_block_delta", {"index": self.index, "delta": {
                        "type": "input_json_delta", "partial_json": fn["arguments"]}}))
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return events

    def end(self, usage: dict[str, Any], matched: Any) -> list[str]:
        reason, sequence = _stop(self.finish, matched)
        return self._close() + [  # the usage in full, so the accumulated message reads as the whole one
            _event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                     "usage": _usage(usage)}),
            _event("message_stop", {}),
        ]


async def stream_events(state: ServerState, run: ChatRun, t: StreamTranslator) -> AsyncIterator[str]:
    yield t.start()
    usage = None
    async for event in chat_stream(state, run, include_usage=True):
        data = event[len("data: "):].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            status = 503 if chunk["error"].get("type") == "service_unavailable" else 500
            yield _event("error", anthropic_error_body(status, chunk["error"]["message"]))
            return
        if chunk.get("usage"):
            usage = chunk["usage"]
        for e in t.feed(chunk):
            yield e
    if usage is None:
        return
    final = run.er.final
    matched = final.outputs[0].stop_reason if final is not None and final.outputs else None
    for e in t.end(usage, matched):
        yield e
