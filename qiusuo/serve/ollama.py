"""Ollama's API on the same server: /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version.

A thin translation (field names from Ollama's docs/api.md and its Python client's types): each
request becomes the `ChatCompletionRequest` the OpenAI route takes and runs through
`chat.start_chat`, and the answer is read back from the OpenAI route's own body or SSE events. So
there is one path to the engine, and whatever the chat route learns (structured outputs, tool
calls) reaches these routes by the fields they already map: `format` ("json" or a JSON schema) is
sent as `response_format`, `tools` as `tools` (until the server supports those, they are refused
with a 400 naming the Ollama field).

Ollama's rules kept: `stream` defaults to true (NDJSON lines, `application/x-ndjson`); reasoning
goes to `message.thinking` (`thinking` in /api/generate); errors are `{"error": "..."}` with the
HTTP status, also as a last NDJSON line when the engine fails mid-stream; names are `NAME[:TAG]`
with `latest` by default, so `adder` and `adder:latest` are the same model. Durations are in
nanoseconds.

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

import functools
import hashlib
import json
import time
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from qiusuo.engine.reasoning import think_ids

from .chat import ChatRun, chat_response, chat_stream, finish_chat, start_chat, translated_request
from .protocol import ChatCompletionRequest, OpenAIError
from .serving import ServerState, check_text_fits
from .streaming import AbortingStreamingResponse

# The Ollama release whose API these routes follow; clients gate features (thinking: >= 0.9) on it.
OLLAMA_API_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"

# The Ollama field each OpenAI field came from, for error messages.
_PARAM_NAMES = {"max_tokens": "options.num_predict", "response_format": "format", "temperature": "options.temperature",
                "top_p": "options.top_p", "top_k": "options.top_k", "seed": "options.seed", "stop": "options.stop",
                "presence_penalty": "options.presence_penalty", "frequency_penalty": "options.frequency_penalty",
                "reasoning_effort": "think", "thinking_budget": "think"}
# Options the engine cannot honour, with the value that means "off" (any other is refused).
_NEUTRAL = {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "mirostat": 0,
            "tfs_z": 1.0, "typical_p": 1.0, "min_p": 0.0}


class OllamaError(Exception):
    """A client error rendered as Ollama's `{"error": "..."}`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def ollama_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _from_openai(e: OpenAIError) -> OllamaError:
    message = e.message
    if e.param in _PARAM_NAMES:
        message = message.replace(e.param, _PARAM_NAMES[e.param])
    return OllamaError(e.status, message)


# ---------------------------------------------------------------------- request bodies
class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Options(_Body):
    model_config = ConfigDict(extra="allow")  # load-time options are ignored; see _NEUTRAL for the refused ones

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    num_predict: int | None = Field(None, ge=-2)
    num_ctx: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: list[str] | str | None = None

    def refused(self) -> list[str]:
        extra = self.model_extra or {}
        return [f"options.{k}" for k, neutral in _NEUTRAL.items()
                if extra.get(k) is not None and extra[k] != neutral]


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    thinking: str | None = None
    images: list[Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


Think = bool | Literal["low", "medium", "high"] | None


class _Common(_Body):
    model: str = Field(min_length=1)
    stream: bool = True  # Ollama's default
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    think: Think = None
    keep_alive: float | str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ChatRequest(_Common):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Any] | None = None


class GenerateRequest(_Common):
    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[Any] | None = None


class ShowRequest(_Body):
    model: str | None = None
    name: str | None = None  # the older field name
    verbose: bool = False


# ---------------------------------------------------------------------- names and model facts
def canonical(name: str) -> str:
    """`adder` -> `adder:latest`; a name that is not NAME[:TAG] (a path) stays as it is."""
    from qiusuo.registry.registry import RegistryError, parse_name

    try:
        base, tag = parse_name(name)
    except RegistryError:
        return name
    return f"{base}:{tag}"


def resolve_name(state: ServerState, name: str) -> str:
    """The served model's name (what `start_chat` checks) for an Ollama-style `name`, or a 404."""
    served = state.config.served_model_name
    if name == served or canonical(name) == canonical(served):
        return served
    raise OllamaError(404, f"model '{name}' not found; this server serves '{canonical(served)}'")


@functools.lru_cache(maxsize=8)
def _registry_info(ref: str):
    """The registry's entry for `ref` (size, digest, parameters, time), or None when it has none."""
    from qiusuo.registry import Registry
    from qiusuo.registry.registry import RegistryError

    try:
        return Registry().show(ref)
    except (RegistryError, OSError, ValueError):
        return None


def _parameter_size(n: int | None) -> str:
    if not n:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def model_entry(state: ServerState) -> dict[str, Any]:
    """The model as /api/tags, /api/ps and /api/show describe it."""
    name = canonical(state.config.served_model_name)
    info = _registry_info(name)
    files = sorted(f.digest for f in info.files) if info is not None else [name]
    digest = hashlib.sha256("\n".join(files).encode()).hexdigest()
    modified = datetime.fromtimestamp(info.created if info is not None else state.started, timezone.utc)
    family = (info.model_type if info is not None else None) or "qiusuo"
    details = {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
               "parameter_size": _parameter_size(info.parameters if info is not None else None),
               "quantization_level": str((info.metadata or {}).get("quantization", "")) if info is not None else ""}
    return {"name": name, "model": name, "modified_at": modified.isoformat().replace("+00:00", "Z"),
            "size": info.size if info is not None else 0, "digest": digest, "details": details,
            "_parameters": info.parameters if info is not None else None,
            "_architecture": (info.architecture if info is not None else None) or family}


def tools_supported() -> bool:
    """True once the chat route takes `tools` (the tool-calling work plugs in there)."""
    probe = {"model": "m", "messages": [{"role": "user", "content": "x"}],
             "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    try:
        return "tools" not in ChatCompletionRequest.model_validate(probe).unsupported()
    except ValidationError:
        return False


def capabilities(state: ServerState) -> list[str]:
    caps = ["completion"]
    start, end = think_ids(state.tokenizer)
    if start is not None and end is not None:
        caps.append("thinking")
    template = getattr(state.tokenizer, "chat_template", None) or ""
    if "tools" in template and tools_supported():
        caps.append("tools")
    return caps


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


def _openai_body(state: ServerState, req: _Common, messages: list[dict[str, Any]], num_prompt_tokens: int,
                 stream: bool) -> dict[str, Any]:
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
    from .chat import render_prompt

    return render_prompt(state, _chat_request({**openai_probe, "messages": messages}))


# ---------------------------------------------------------------------- routes
def ollama_router(state: ServerState) -> APIRouter:
    router = APIRouter()

    def guard(fn):
        @functools.wraps(fn)
        async def wrapped(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except OllamaError as e:
                return ollama_error(e.status, e.message)
            except OpenAIError as e:
                err = _from_openai(e)
                return JSONResponse({"error": err.message}, status_code=err.status, headers=e.headers)
        return wrapped

    @router.post("/api/chat")
    @guard
    async def chat(req: ChatRequest, raw: Request):
        arrival = time.monotonic()
        state.ready()
        served = resolve_name(state, req.model)
        if not req.messages:  # Ollama's "load the model" call
            return JSONResponse({"model": req.model, "created_at": _now(), "message": {"role": "assistant",
                                 "content": ""}, "done": True, "done_reason": "load"})
        messages = _messages(req)
        probe = {"model": served, "messages": messages}
        prompt_ids = _prompt_tokens(state, messages, probe)
        body = _openai_body(state, req, messages, len(prompt_ids), req.stream)
        if req.tools:  # passed on: the chat route refuses them (400) until it supports tools
            body["tools"] = req.tools
        return await _respond(state, _chat_request(body), raw, True, req.think, req.model, arrival, prompt_ids)

    @router.post("/api/generate")
    @guard
    async def generate(req: GenerateRequest, raw: Request):
        arrival = time.monotonic()
        state.ready()
        served = resolve_name(state, req.model)
        for field in ("suffix", "template", "images"):
            if getattr(req, field):
                raise OllamaError(400, f"{field} is not supported by this server; leave it unset")
        if not req.prompt and not req.context:  # Ollama's "load the model" call
            return JSONResponse({"model": req.model, "created_at": _now(), "response": "", "done": True,
                                 "done_reason": "load"})
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

    @router.get("/api/tags")
    async def tags():
        entry = {k: v for k, v in model_entry(state).items() if not k.startswith("_")}
        return {"models": [entry]}

    @router.post("/api/show")
    @guard
    async def show(req: ShowRequest):
        state.ready()
        resolve_name(state, req.model or req.name or "")
        entry = model_entry(state)
        arch = entry["_architecture"]
        info = {"general.architecture": arch, "general.parameter_count": entry["_parameters"],
                f"{arch}.context_length": state.max_model_len}
        return {"modelfile": f"FROM {entry['name']}\n", "parameters": "", "license": "",
                "template": getattr(state.tokenizer, "chat_template", None) or "", "details": entry["details"],
                "model_info": info, "capabilities": capabilities(state), "modified_at": entry["modified_at"]}

    @router.get("/api/ps")
    async def ps():
        if state.engine is None:
            return {"models": []}
        entry = {k: v for k, v in model_entry(state).items() if not k.startswith("_")}
        entry.update(expires_at="9999-12-31T23:59:59Z", size_vram=0, context_length=state.max_model_len)
        return {"models": [entry]}

    @router.get("/api/version")
    async def version():
        from qiusuo import __version__

        return {"version": OLLAMA_API_VERSION, "qiusuo_version": __version__}

    @router.get("/api/{rest:path}")
    @router.post("/api/{rest:path}")
    @router.delete("/api/{rest:path}")
    async def other(rest: str):
        return ollama_error(404, f"/api/{rest} is not served here: this server answers /api/chat, /api/generate, "
                                 "/api/tags, /api/show, /api/ps and /api/version (models are managed with "
                                 "`qiusuo models`)")

    return router
