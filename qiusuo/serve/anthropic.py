"""Anthropic's Messages API on the same server: POST /v1/messages (and /v1/messages/count_tokens).

A thin translation, as ollama.py: the request becomes the `ChatCompletionRequest` the OpenAI route
takes and runs through `chat.start_chat`; the answer is read back from that route's body or SSE
events and rewritten as Anthropic's content blocks and stream events (message_start,
content_block_start/delta/stop, message_delta, message_stop; field names from
docs.anthropic.com, "Messages" and "Streaming Messages"). `tools`/`tool_choice` and
`tool_use`/`tool_result` blocks are translated to OpenAI's tools, tool_calls and `tool` messages
(tool_choice `auto`, `none`, `any` -> "required", `tool` -> a named function, the last two forced
by the grammar; `disable_parallel_tool_use` -> `parallel_tool_calls: false`), and tool calls coming
back to `tool_use` blocks with `toolu_` ids (`input_json_delta` when streamed), `stop_reason:
"tool_use"`.

Thinking: `thinking: {"type": "enabled", "budget_tokens": N}` is a thinking budget of N reasoning
tokens (Anthropic requires N >= 1024; a local model with a short context may take fewer, so only
N < max_tokens is enforced, as Anthropic does); `{"type": "disabled"}` closes the think block at
once; `adaptive` or no `thinking` lets the model think as the OpenAI route does (the server's
default budget), and its reasoning comes back as a `thinking` block all the same: a reasoning model
always reasons, and hiding it would bill tokens the client cannot see. `display: "omitted"` sends
the block empty. A thinking block's `signature` is a SHA-256 of its text (an opaque value, never
checked: thinking sent back is handed to the chat template, which decides whether it shows).

Errors are `{"type": "error", "error": {"type", "message"}}` with Anthropic's type per status,
also as an `error` event when the engine fails mid-stream. The Bearer key may also come as
`x-api-key` (what the anthropic client sends); see app.py.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request

from .chat import (ChatRun, chat_response, chat_stream, finish_chat, render_prompt, start_chat,
                   translated_request)
from .protocol import MAX_STOP_STRINGS, ChatCompletionRequest, OpenAIError
from .serving import ServerState
from .streaming import AbortingStreamingResponse

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                503: "overloaded_error", 529: "overloaded_error"}
_PARAM_NAMES = {"stop": "stop_sequences", "thinking_budget": "thinking.budget_tokens", "messages": "messages"}
_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}


class AnthropicError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error" if status >= 500
                                                                  else "invalid_request_error"), "message": message}}


def anthropic_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message), status_code=status, headers=headers)


def _from_openai(e: OpenAIError) -> AnthropicError:
    message = e.message
    if e.param in _PARAM_NAMES:
        message = message.replace(e.param, _PARAM_NAMES[e.param])
    return AnthropicError(e.status, message, e.headers)


# ---------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Thinking(_Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)
    display: Literal["summarized", "omitted"] | None = None


class InMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(_Body):
    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    messages: list[InMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    thinking: Thinking | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class CountTokensRequest(_Body):
    model: str = Field(min_length=1)
    messages: list[InMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None


# ---------------------------------------------------------------------- translation to the chat route
def _text_of(blocks: str | list[dict[str, Any]], where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    parts = []
    for i, b in enumerate(blocks):
        if b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise AnthropicError(400, f"{where}[{i}]: only text blocks are allowed here, got {b.get('type')!r}")
        parts.append(b["text"])
    return "".join(parts)


def _messages(system: str | list[dict[str, Any]] | None, messages: list[InMessage]) -> list[dict[str, Any]]:
    """Anthropic's turns -> OpenAI's messages (thinking -> reasoning_content, tool blocks -> tool calls)."""
    out: list[dict[str, Any]] = []
    if system:
        out.append({"role": "system", "content": _text_of(system, "system")})
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        text, thinking, calls = [], [], []
        for j, b in enumerate(m.content):
            kind, where = b.get("type"), f"messages[{i}].content[{j}]"
            if kind == "text":
                text.append(str(b.get("text", "")))
            elif kind == "thinking" and m.role == "assistant":
                thinking.append(str(b.get("thinking", "")))
            elif kind == "redacted_thinking" and m.role == "assistant":
                continue  # opaque by definition: nothing to render
            elif kind == "tool_use" and m.role == "assistant":
                calls.append({"id": b.get("id"), "type": "function",
                              "function": {"name": b.get("name"), "arguments": json.dumps(b.get("input", {}))}})
            elif kind == "tool_result" and m.role == "user":
                content = b.get("content", "")
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                            "content": content if isinstance(content, str) else _text_of(content, where + ".content")})
            else:
                raise AnthropicError(400, f"{where}: a {kind!r} block is not supported in a {m.role} message "
                                          "(this model reads text; images and documents are refused)")
        if text or thinking or calls or m.role == "assistant":
            msg: dict[str, Any] = {"role": m.role, "content": "".join(text)}
            if thinking:
                msg["reasoning_content"] = "".join(thinking)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def _tools(req: MessagesRequest) -> dict[str, Any]:
    """Anthropic's tools and tool_choice -> OpenAI's (the chat route refuses them until it supports tools)."""
    if not req.tools:
        return {}
    body: dict[str, Any] = {"tools": [{"type": "function", "function": {
        "name": t.get("name"), "description": t.get("description", ""),
        "parameters": t.get("input_schema", {"type": "object"})}} for t in req.tools]}
    choice = req.tool_choice or {}
    kind = choice.get("type")
    if kind == "any":
        body["tool_choice"] = "required"
    elif kind == "tool":
        body["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    elif kind in ("auto", "none"):
        body["tool_choice"] = kind
    if choice.get("disable_parallel_tool_use"):
        body["parallel_tool_calls"] = False
    return body


def _thinking(req: MessagesRequest) -> dict[str, Any]:
    t = req.thinking
    if t is None or t.type == "adaptive":
        return {}
    if t.type == "disabled":
        return {"thinking_budget": 0}
    if t.budget_tokens is None:
        raise AnthropicError(400, "thinking.budget_tokens: required when thinking.type is \"enabled\"")
    if t.budget_tokens >= req.max_tokens:
        raise AnthropicError(400, f"thinking.budget_tokens={t.budget_tokens} must be less than "
                                  f"max_tokens={req.max_tokens}")
    return {"thinking_budget": t.budget_tokens}


def _openai_body(served: str, req: MessagesRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": served, "messages": _messages(req.system, req.messages), "max_tokens": req.max_tokens,
        "stream": req.stream, "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k,
        "stop": req.stop_sequences, **_thinking(req), **_tools(req),
    }
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    return {k: v for k, v in body.items() if v is not None}


def _chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    return translated_request(body, AnthropicError, _PARAM_NAMES)


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


def _display(req: MessagesRequest) -> str:
    """How thinking blocks are sent: "full", "omitted" (empty, signature only) or "none" (disabled)."""
    if req.thinking is None:
        return "full"
    if req.thinking.type == "disabled":
        return "none"
    return "omitted" if req.thinking.display == "omitted" else "full"


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
                    events += self._open(key, {"type": "tool_use", "id": tool_use_id(call.get("id")), "name": fn.get("name"),
                                               "input": {}})
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


async def _events(state: ServerState, run: ChatRun, t: StreamTranslator) -> AsyncIterator[str]:
    yield t.start()
    usage = None
    async for event in chat_stream(state, run, include_usage=True):
        data = event[len("data: "):].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            status = 503 if chunk["error"].get("type") == "service_unavailable" else 500
            yield _event("error", error_body(status, chunk["error"]["message"]))
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


# ---------------------------------------------------------------------- routes
def anthropic_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    def guard(fn):
        @functools.wraps(fn)
        async def wrapped(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except AnthropicError as e:
                return anthropic_error(e.status, e.message, e.headers)
            except OpenAIError as e:
                err = _from_openai(e)
                return anthropic_error(err.status, err.message, err.headers)
        return wrapped

    def served(name: str) -> str:
        if name != state.config.served_model_name:
            raise AnthropicError(404, f"model: {name!r} not found; this server serves "
                                      f"{state.config.served_model_name!r}")
        return name

    @router.post("/v1/messages")
    @guard
    async def messages(req: MessagesRequest, raw: Request):
        arrival = time.monotonic()
        state.ready()
        openai_req = _chat_request(_openai_body(served(req.model), req))
        run = await start_chat(state, openai_req, arrival=arrival, api="anthropic")
        message_id = "msg_" + run.er.request_id.split("-", 1)[1]
        display = _display(req)
        if req.stream:
            t = StreamTranslator(req.model, message_id, len(run.er.prompt_ids), display)
            return AbortingStreamingResponse(_events(state, run, t), on_close=run.er.close)
        final = await finish_chat(run, raw)
        if final is None:
            return Response(status_code=499)
        return JSONResponse(message_body(chat_response(state, run, final), req.model, message_id, display))

    @router.post("/v1/messages/count_tokens")
    @guard
    async def count_tokens(req: CountTokensRequest):
        state.ready()
        body = {"model": served(req.model), "messages": _messages(req.system, req.messages)}
        if req.tools:
            body.update(_tools(MessagesRequest(model=req.model, max_tokens=1, messages=req.messages,
                                               tools=req.tools)))
        return {"input_tokens": len(render_prompt(state, _chat_request(body)))}

    return router
