"""Ollama's API on the same server: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version.

A thin translation (field names from Ollama's docs/api.md and its Python client's types; the
bodies in ollama_protocol.py, names and model facts for /api/tags, /api/show, /api/ps in
ollama_models.py): each request becomes the `ChatCompletionRequest` the OpenAI route takes and
runs through `chat.start_chat`, and the answer is read back from the OpenAI route's own body or SSE
events. So there is one path to the engine, and whatever the chat route learns (structured
outputs, tool calls) reaches these routes by the fields they already map: `format` ("json" or a
JSON schema) is sent as `response_format`, `tools` as `tools`, and tool calls come back as
`message.tool_calls` (arguments as an object).

Ollama's rules kept: `stream` defaults to true (NDJSON lines, `application/x-ndjson`); reasoning
goes to `message.thinking` (`thinking` in /api/generate); errors are `{"error": "..."}` with the
HTTP status (errors.py), also as a last NDJSON line when the engine fails mid-stream; names are
`NAME[:TAG]` with `latest` by default, so `adder` and `adder:latest` are the same model. Durations
are in nanoseconds.

Where we differ, on purpose:
- A prompt longer than the context is a 400 (`context_length_exceeded` in the message), never
  silently cut to its last tokens as Ollama does. `options.num_ctx` lowers the context for the
  request (prompt + output must fit it); above the model's context it is lowered to that.
- `num_predict` (-1/-2 or unset: until the context is full) is lowered to the room the context
  leaves instead of shifting the context.
- `think`: true or unset: reasoning as it comes; false: the think block is closed at once
  (thinking budget 0); "low"/"medium"/"high": the `reasoning_effort` budgets. `think` on a model
  with no think tags is a 400, as in Ollama.
- Sampling options the engine cannot honour (penalties, mirostat, tfs_z, typical_p, min_p) are a
  400 when set to anything but their neutral value; load-time options (num_gpu, num_thread,
  use_mmap, ...) and `keep_alive` are accepted and ignored: one model stays loaded for the
  server's life.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from starlette.requests import Request

from qiusuo.engine.reasoning import think_ids

from . import ollama_models as models
from .chat import ChatRun, chat_response, chat_stream, finish_chat, render_prompt, start_chat, translated_request
from .errors import translating_errors
from .ollama_models import canonical, resolve_name
from .ollama_protocol import (BaseGenerateRequest, ChatRequest, GenerateRequest, OllamaError, Options, ShowRequest,
                              Think)
from .params import check_text_fits
from .protocol import ChatCompletionRequest
from .serving import ServerState
from .streaming import AbortingStreamingResponse

NDJSON = "application/x-ndjson"

# The Ollama field each OpenAI field came from, for error messages.
_PARAM_NAMES = {"max_tokens": "options.num_predict", "response_format": "format", "temperature": "options.temperature",
                "top_p": "options.top_p", "top_k": "options.top_k", "seed": "options.seed", "stop": "options.stop",
                "presence_penalty": "options.presence_penalty", "frequency_penalty": "options.frequency_penalty",
                "reasoning_effort": "think", "thinking_budget": "think"}


# ---------------------------------------------------------------------- translation to the chat route
def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _think_fields(state: ServerState, think: Think) -> dict[str, Any]:
    if think is None:
        return {}
    start, end = think_ids(state.tokenizer)
    if start is None or end is None:
        if think is False:
            return {}  # nothing to turn off
        raise OllamaError(400, f"'{canonical(state.config.served_model_name)}' does not support thinking")
    if think is True:
        return {}
    if think is False:
        return {"thinking_budget": 0}
    return {"reasoning_effort": think}


def _format_field(fmt: str | dict[str, Any] | None) -> dict[str, Any] | None:
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt, "strict": True}}
    raise OllamaError(400, f"format must be \"json\" or a JSON schema object, got {fmt!r}")


def _context_limit(state: ServerState, options: Options) -> int:
    ctx = state.max_model_len
    return min(options.num_ctx, ctx) if options.num_ctx is not None else ctx


def _openai_body(state: ServerState, req: BaseGenerateRequest, messages: list[dict[str, Any]],
                 num_prompt_tokens: int, stream: bool) -> dict[str, Any]:
    """The chat-completions body for an Ollama request whose prompt has `num_prompt_tokens` tokens."""
    options = req.options or Options()
    refused = options.refused()
    if refused:
        raise OllamaError(400, f"{', '.join(refused)} is not supported by this server; leave it unset (or at its "
                               "neutral value).")
    ctx = _context_limit(state, options)
    if num_prompt_tokens >= ctx:
        raise OllamaError(400, f"context_length_exceeded: the prompt has {num_prompt_tokens} tokens but the "
                               f"context holds {ctx} (num_ctx, at most the model's {state.max_model_len}); "
                               "shorten the prompt: it is never truncated silently.")
    room = ctx - num_prompt_tokens
    max_tokens = room if options.num_predict in (None, -1, -2) else min(options.num_predict, room)
    if max_tokens == 0:
        max_tokens = 1  # num_predict=0 is not a length the engine runs; one token, as a load check does
    body: dict[str, Any] = {
        "model": resolve_name(state, req.model), "messages": messages, "max_tokens": max_tokens, "stream": stream,
        "temperature": options.temperature, "top_p": options.top_p, "top_k": options.top_k, "seed": options.seed,
        "stop": options.stop, "logprobs": req.logprobs, "top_logprobs": req.top_logprobs,
        "response_format": _format_field(req.format), **_think_fields(state, req.think),
    }
    extra = options.model_extra or {}
    for k in ("presence_penalty", "frequency_penalty"):
        if extra.get(k):
            body[k] = extra[k]
    if stream:
        body["stream_options"] = {"include_usage": True}
    return {k: v for k, v in body.items() if v is not None}


def _chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    return translated_request(body, OllamaError, _PARAM_NAMES)


def _messages(req: ChatRequest) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(req.messages):
        if m.images:
            raise OllamaError(400, f"messages[{i}].images: this model reads text only")
        msg: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.thinking:
            msg["reasoning_content"] = m.thinking  # the chat template decides whether earlier reasoning shows
        if m.tool_calls:  # Ollama's {"function": {"name", "arguments": {...}}} -> OpenAI's
            msg["tool_calls"] = [{"id": f"call_{i}_{j}", "type": "function",
                                  "function": {"name": (c.get("function") or {}).get("name"),
                                               "arguments": json.dumps((c.get("function") or {}).get("arguments", {}))}}
                                 for j, c in enumerate(m.tool_calls)]
        if m.tool_name:
            msg["name"] = m.tool_name
        out.append(msg)
    return out


def _logprobs(choice_logprobs: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    if not choice_logprobs:
        return None
    return [{"token": e["token"], "logprob": e["logprob"], "bytes": e.get("bytes"),
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t.get("bytes")}
                              for t in e.get("top_logprobs", [])]} for e in choice_logprobs.get("content") or []]


def _timings(run: ChatRun, arrival: float, first: float | None, end: float, prompt_tokens: int,
             completion_tokens: int) -> dict[str, Any]:
    first = first if first is not None else end
    return {"total_duration": int((end - arrival) * 1e9), "load_duration": 0,
            "prompt_eval_count": prompt_tokens, "prompt_eval_duration": int((first - arrival) * 1e9),
            "eval_count": completion_tokens, "eval_duration": int((end - first) * 1e9)}


class _Translation:
    """One request's shape: /api/chat (`message`) or /api/generate (`response`, `thinking`, `context`)."""

    def __init__(self, state: ServerState, run: ChatRun, model: str, chat: bool, think: Think, arrival: float):
        self.state, self.run, self.model, self.chat, self.arrival = state, run, model, chat, arrival
        self.show_thinking = think is not False

    def piece(self, content: str, thinking: str | None, logprobs=None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "created_at": _now()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking and self.show_thinking:
                message["thinking"] = thinking
            body["message"] = message
        else:
            body["response"] = content
            if thinking and self.show_thinking:
                body["thinking"] = thinking
        if logprobs:
            body["logprobs"] = logprobs
        body["done"] = False
        return body

    def done(self, body: dict[str, Any], finish: str | None, usage: dict[str, Any], first: float | None,
             truncated: bool) -> dict[str, Any]:
        body.update(done=True, done_reason=finish or "stop",
                    **_timings(self.run, self.arrival, first, time.monotonic(), usage["prompt_tokens"],
                               usage["completion_tokens"]))
        body["reasoning_truncated"] = truncated  # ours: the think block was closed by a budget or the reserve
        if not self.chat and self.run.er.final is not None:
            body["context"] = [*self.run.er.prompt_ids, *self.run.er.final.outputs[0].token_ids]
        return body

    def whole(self, response: dict[str, Any]) -> dict[str, Any]:
        choice = response["choices"][0]
        m = choice["message"]
        body = self.piece(m["content"] or "", m.get("reasoning_content"), _logprobs(choice.get("logprobs")))
        if self.chat and m.get("tool_calls"):  # OpenAI's -> Ollama's (arguments as an object)
            body["message"]["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                                           "arguments": json.loads(c["function"]["arguments"])}}
                                             for c in m["tool_calls"]]
        return self.done(body, choice["finish_reason"], response["usage"], self.run.er.first_token_time,
                         bool(choice.get("reasoning_truncated")))

    async def lines(self) -> AsyncIterator[str]:
        """NDJSON lines translated from the chat route's SSE events."""
        finish, truncated, usage = None, False, None
        async for event in chat_stream(self.state, self.run, include_usage=True):
            data = event[len("data: "):].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                yield json.dumps({"error": chunk["error"]["message"]}) + "\n"
                return
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                delta = choice.get("delta") or {}
                if choice.get("finish_reason"):
                    finish, truncated = choice["finish_reason"], bool(choice.get("reasoning_truncated"))
                content, thinking = delta.get("content") or "", delta.get("reasoning_content")
                lps = _logprobs(choice.get("logprobs"))
                if content or (thinking and self.show_thinking) or lps:
                    yield json.dumps(self.piece(content, thinking, lps), ensure_ascii=False) + "\n"
        if usage is None:
            return
        last = self.done(self.piece("", None), finish, usage, self.run.er.first_token_time, truncated)
        yield json.dumps(last) + "\n"


async def _respond(state: ServerState, openai_req: ChatCompletionRequest, raw: Request, chat: bool, think: Think,
                   model: str, arrival: float, prompt_ids: list[int] | None = None) -> Response:
    run = await start_chat(state, openai_req, prompt_ids, arrival, api="ollama")
    t = _Translation(state, run, model, chat, think, arrival)
    if openai_req.stream:
        return AbortingStreamingResponse(t.lines(), on_close=run.er.close, media_type=NDJSON)
    final = await finish_chat(run, raw)
    if final is None:
        return Response(status_code=499)
    return JSONResponse(t.whole(chat_response(state, run, final)))


def _prompt_tokens(state: ServerState, messages: list[dict[str, Any]], openai_probe: dict[str, Any]) -> list[int]:
    return render_prompt(state, _chat_request({**openai_probe, "messages": messages}))


# ---------------------------------------------------------------------- routes
def _start(state: ServerState, model: str) -> tuple[float, str]:
    """What /api/chat and /api/generate do first: note the arrival, check that the engine serves,
    resolve the Ollama-style name. (arrival time, served model name)"""
    arrival = time.monotonic()
    state.ready()
    return arrival, resolve_name(state, model)


def _loaded(model: str, chat: bool) -> JSONResponse:
    """The answer to Ollama's "load the model" call (no messages, or no prompt)."""
    body = {"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}
    return JSONResponse({"model": model, "created_at": _now(), **body, "done": True, "done_reason": "load"})


async def chat(state: ServerState, req: ChatRequest, raw: Request) -> Response:
    """POST /api/chat."""
    arrival, served = _start(state, req.model)
    if not req.messages:
        return _loaded(req.model, chat=True)
    messages = _messages(req)
    prompt_ids = _prompt_tokens(state, messages, {"model": served, "messages": messages})
    body = _openai_body(state, req, messages, len(prompt_ids), req.stream)
    if req.tools:
        body["tools"] = req.tools
    return await _respond(state, _chat_request(body), raw, True, req.think, req.model, arrival, prompt_ids)


async def generate(state: ServerState, req: GenerateRequest, raw: Request) -> Response:
    """POST /api/generate: a templated prompt (with `system`), or `raw`; `context` continues a
    previous answer (its token ids)."""
    arrival, served = _start(state, req.model)
    for field in ("suffix", "template", "images"):
        if getattr(req, field):
            raise OllamaError(400, f"{field} is not supported by this server; leave it unset")
    if not req.prompt and not req.context:
        return _loaded(req.model, chat=False)
    if req.raw:
        if req.system:
            raise OllamaError(400, "system is not used with raw=true; put it in the prompt")
        check_text_fits(state, req.prompt or "", "prompt")
        text_ids = state.tokenizer.encode(req.prompt or "", add_special_tokens=not req.context)
        messages = [{"role": "user", "content": req.prompt or ""}]  # not rendered: the ids are the prompt
    else:
        messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
                   [{"role": "user", "content": req.prompt or ""}]
        text_ids = _prompt_tokens(state, messages, {"model": served})
    prompt_ids = [*(req.context or []), *text_ids]
    vocab = state.engine.vocab_size
    if req.context and (min(req.context) < 0 or max(req.context) >= vocab):
        raise OllamaError(400, f"context: token ids must be in [0, {vocab})")
    body = _openai_body(state, req, messages, len(prompt_ids), req.stream)
    return await _respond(state, _chat_request(body), raw, False, req.think, req.model, arrival, prompt_ids)


def ollama_router(state: ServerState) -> APIRouter:
    router = APIRouter()
    errors = translating_errors("ollama", _PARAM_NAMES)

    @router.post("/api/chat")
    @errors
    async def chat_route(req: ChatRequest, raw: Request):
        return await chat(state, req, raw)

    @router.post("/api/generate")
    @errors
    async def generate_route(req: GenerateRequest, raw: Request):
        return await generate(state, req, raw)

    @router.get("/api/tags")
    async def tags_route():
        return models.tags(state)

    @router.post("/api/show")
    @errors
    async def show_route(req: ShowRequest):
        return models.show(state, req)

    @router.get("/api/ps")
    async def ps_route():
        return models.ps(state)

    @router.get("/api/version")
    async def version_route():
        return models.version()

    @router.get("/api/{rest:path}")
    @router.post("/api/{rest:path}")
    @router.delete("/api/{rest:path}")
    @errors
    async def other(rest: str):
        raise OllamaError(404, f"/api/{rest} is not served here: this server answers /api/chat, /api/generate, "
                               "/api/tags, /api/show, /api/ps and /api/version (models are managed with "
                               "`qiusuo models`)")

    return router
