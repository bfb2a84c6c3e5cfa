"""Anthropic's Messages API on the same server: POST /v1/messages (and /v1/messages/count_tokens).

A thin translation, as ollama.py: the request (anthropic_protocol.py) becomes the
`ChatCompletionRequest` the OpenAI route takes and runs through `chat.start_chat`; the answer is
read back from that route's body or SSE events and rewritten as Anthropic's content blocks and
stream events (anthropic_response.py). `tools`/`tool_choice` and
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
the block empty. Thinking sent back is handed to the chat template, which decides whether it shows.

Errors are `{"type": "error", "error": {"type", "message"}}` with Anthropic's type per status
(errors.py), also as an `error` event when the engine fails mid-stream. The Bearer key may also
come as `x-api-key` (what the anthropic client sends); see app.py.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from .anthropic_protocol import AnthropicError, CountTokensRequest, InMessage, MessagesRequest
from .anthropic_response import StreamTranslator, message_body, stream_events
from .chat import chat_response, finish_chat, render_prompt, start_chat, translated_request
from .errors import translating_errors
from .protocol import ChatCompletionRequest
from .serving import ServerState
from .streaming import AbortingStreamingResponse

# The Anthropic field each chat field came from, for error messages.
_PARAM_NAMES = {"stop": "stop_sequences", "thinking_budget": "thinking.budget_tokens", "messages": "messages"}


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


def _display(req: MessagesRequest) -> str:
    """How thinking blocks are sent: "full", "omitted" (empty, signature only) or "none" (disabled)."""
    if req.thinking is None:
        return "full"
    if req.thinking.type == "disabled":
        return "none"
    return "omitted" if req.thinking.display == "omitted" else "full"


# ---------------------------------------------------------------------- routes
def _served(state: ServerState, name: str) -> str:
    if name != state.config.served_model_name and name not in state.lora_names:  # an adapter by its own name
        raise AnthropicError(404, f"model: {name!r} not found; this server serves "
                                  f"{state.config.served_model_name!r}")
    return name


async def create_message(state: ServerState, req: MessagesRequest, raw: Request) -> Response:
    """POST /v1/messages: the request runs on the chat route; its answer comes back as a message."""
    arrival = time.monotonic()
    state.ready()
    openai_req = _chat_request(_openai_body(_served(state, req.model), req))
    run = await start_chat(state, openai_req, arrival=arrival, api="anthropic")
    message_id = "msg_" + run.er.request_id.split("-", 1)[1]
    display = _display(req)
    if req.stream:
        t = StreamTranslator(req.model, message_id, len(run.er.prompt_ids), display)
        return AbortingStreamingResponse(stream_events(state, run, t), on_close=run.er.close)
    final = await finish_chat(run, raw)
    if final is None:
        return Response(status_code=499)
    return JSONResponse(message_body(chat_response(state, run, final), req.model, message_id, display))


def count_tokens(state: ServerState, req: CountTokensRequest) -> dict[str, int]:
    """POST /v1/messages/count_tokens: the prompt's length as the chat template renders it."""
    state.ready()
    body = {"model": _served(state, req.model), "messages": _messages(req.system, req.messages)}
    if req.tools:
        body.update(_tools(MessagesRequest(model=req.model, max_tokens=1, messages=req.messages, tools=req.tools)))
    return {"input_tokens": len(render_prompt(state, _chat_request(body)))}


def anthropic_router(state: ServerState) -> APIRouter:
    router = APIRouter()
    errors = translating_errors("anthropic", _PARAM_NAMES)

    @router.post("/v1/messages")
    @errors
    async def messages(req: MessagesRequest, raw: Request):
        return await create_message(state, req, raw)

    @router.post("/v1/messages/count_tokens")
    @errors
    async def tokens(req: CountTokensRequest):
        return count_tokens(state, req)

    return router
