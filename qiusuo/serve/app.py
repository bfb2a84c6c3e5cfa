"""`create_app`: the FastAPI app of the server: OpenAI's API, and Ollama's and Anthropic's on top.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health (503 while
the model loads or the engine restarts, 200 when it serves; public, as llama.cpp's), GET /metrics
(Prometheus); Ollama's /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version
(ollama.py) and Anthropic's POST /v1/messages, /v1/messages/count_tokens (anthropic.py), both
translations onto the chat route. Every other route, /metrics and the OpenAPI pages included, needs
the key when one is set (vLLM protects only /v1/*, its #18892), as `Authorization: Bearer KEY` or
`x-api-key: KEY` (the anthropic client's header). Every error a client can cause comes back with a
4xx in the shape of the API it called (errors.py): OpenAI's `{"error": {"message", "type", "param",
"code"}}`, Ollama's `{"error": "..."}` under /api/, Anthropic's `{"type": "error", "error": {"type",
"message"}}` under /v1/messages; a body over the size limit
(`max_body_bytes`, by default sized from the model's context: config.py) is refused with 413
before it is parsed: on its Content-Length before any of it is read, or, chunked, as soon as the
bytes received pass the limit.

The engine steps on a thread of this process or, with `engine_process=True`, in an engine-core
process of its own (core_client.py: one client interface, two transports); the routes cannot
tell the difference.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qiusuo.engine import LLMEngine

from . import anthropic, ollama
from .chat import create_chat_completion
from .completions import create_completion
from .config import BODY_BYTES_WHILE_LOADING, ServerConfig, body_limit_for_context
from .core import check_loader, is_engine
from .core_client import EngineCoreClient
from .errors import shaped_error
from .outputs import EngineLoadError
from .protocol import ChatCompletionRequest, CompletionRequest, OpenAIError
from .serving import ServerState

log = logging.getLogger("qiusuo.serve")

EngineSource = LLMEngine | Callable[[], LLMEngine]


def create_app(engine: EngineSource, *, served_model_name: str, engine_process: bool = False,
               **options: Any) -> FastAPI:
    """`engine`: an `LLMEngine` (or an `LLM`), or a zero-argument function that loads one; a function
    runs in the engine's thread at startup while /health answers 503. `options` are the other
    `ServerConfig` fields (api_key, max_queue, max_body_bytes, max_tokens_cap, ...). The engine
    starts and stops with the app (its lifespan).

    engine_process=True: the engine steps in its own process (vLLM V1's engine core), which frees
    the event loop from the engine's GIL, and is restarted if it dies: `engine` must then be a
    picklable loader (a module-level function or `functools.partial`), called in that process.

    `app.state.qiusuo.on_fatal`, when set, is called once if the engine cannot load (or reload):
    `qiusuo serve` uses it to exit 1; without it the server answers 503 with the load error."""
    config = ServerConfig(served_model_name=served_model_name, **options)
    if engine_process:
        check_loader(engine)  # a clear ValueError now, not a failed child at startup
    state = ServerState(config)
    lifespan = functools.partial(_lifespan, state=state, source=engine, multiprocess=engine_process)
    app = FastAPI(title="qiusuo", version="1", lifespan=lifespan)
    app.state.qiusuo = state
    _add_error_handlers(app)
    created = int(time.time())

    @app.get("/health")
    async def health():
        status, message = state.health()
        body = {"status": status} if message is None else {"status": status, "message": message}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models():
        entry = {"id": config.served_model_name, "object": "model", "created": created, "owned_by": "qiusuo"}
        if state.engine is not None:
            entry["max_model_len"] = state.max_model_len
        # each LoRA adapter is a model of its own whose parent is the base (vLLM's listing)
        adapters = [{**entry, "id": name, "root": name, "parent": config.served_model_name}
                    for name in state.lora_names]
        return {"object": "list", "data": [entry, *adapters]}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        return await create_chat_completion(state, req, raw)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await create_completion(state, req, raw)

    app.include_router(ollama.ollama_router(state))
    app.include_router(anthropic.anthropic_router(state))
    return _wrap(app, config, state)


@asynccontextmanager
async def _lifespan(app: FastAPI, *, state: ServerState, source: Any, multiprocess: bool):
    client = EngineCoreClient.make_client(source, multiprocess=multiprocess)
    client.on_fatal = state.fatal
    client.start(asyncio.get_running_loop())

    async def attach_when_ready() -> None:
        try:
            await client.ready()
        except EngineLoadError as e:  # reported by /health and every route (or fatal: see create_app)
            state.load_error = e
            return
        state.engine = client

    waiter = asyncio.get_running_loop().create_task(attach_when_ready())
    if is_engine(source):  # a live engine is ready at once: serve it from the first request
        await asyncio.shield(waiter)
    try:
        yield
    finally:
        waiter.cancel()
        await asyncio.to_thread(client.close)


def _add_error_handlers(app: FastAPI) -> None:
    def path_of(request: Request) -> str:
        return _route(request.scope)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, e: OpenAIError):
        body = shaped_error(path_of(request), e.status, e.message, e.type, e.param, e.code)
        return JSONResponse(body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message = f"The body is not valid JSON: {first.get('ctx', {}).get('error', 'parse error')}"
        else:
            message = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ()) if x != 'body') or 'body'}: "
                                f"{err.get('msg')}" for err in errors[:5])
        return JSONResponse(shaped_error(path_of(request), 400, message, param=".".join(loc) or None,
                                         code=first.get("type")), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(shaped_error(path_of(request), e.status_code, str(e.detail), code=code),
                            status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(shaped_error(path_of(request), 500, f"Internal server error: {type(e).__name__}",
                                         "internal_error"), status_code=500)


def _wrap(app: FastAPI, config: ServerConfig, state: ServerState) -> FastAPI:
    def body_limit() -> int:
        if config.max_body_bytes is not None:
            return config.max_body_bytes
        if state.engine is None:
            return BODY_BYTES_WHILE_LOADING
        return body_limit_for_context(state.max_model_len)

    # Pure ASGI middlewares (not BaseHTTPMiddleware, which buffers streaming responses).
    app.add_middleware(BodyLimit, max_bytes=body_limit)
    if config.api_key is not None:
        app.add_middleware(Auth, api_key=config.api_key)  # added last = runs first
    return app


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


def _route(scope: Scope) -> str:
    """The path inside the app: mounted under a prefix (Ray Serve's route_prefix), the ASGI path
    still carries it, and `root_path` names it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


class Auth:
    """`Authorization: Bearer KEY` or `x-api-key: KEY` on every route except /health, compared in
    constant time (both headers are compared, so the time says nothing about which one was sent)."""

    PUBLIC = frozenset({"/health"})

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected, self.expected_key = app, f"Bearer {api_key}".encode(), api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (route := _route(scope)) not in self.PUBLIC:  # lifespan has no path
            headers = dict(scope["headers"])
            bearer = secrets.compare_digest(headers.get(b"authorization", b""), self.expected)
            key = secrets.compare_digest(headers.get(b"x-api-key", b""), self.expected_key)
            if not (bearer or key):
                await _send_json(send, 401, shaped_error(
                    route, 401, "Incorrect or missing API key: send `Authorization: Bearer <key>` (or "
                    "`x-api-key: <key>`).", "invalid_request_error", code="invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for bodies over `max_bytes` (a number, or a function giving it per request), by
    Content-Length before any of the body is read, or by counting a chunked body as it arrives.

    The body is read here (bounded) and replayed to the app; after it, `receive` is the server's
    own, so the app still sees `http.disconnect`. A Content-Length that lies cannot get past the
    count: the HTTP server never hands over more bytes than it announced.
    """

    def __init__(self, app: ASGIApp, max_bytes: int | Callable[[], int]):
        self.app, self.limit = app, max_bytes if callable(max_bytes) else (lambda: max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self._too_large(scope, send, length, limit)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected before the body ended
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                return await self._too_large(scope, send, None, limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body_sent = False

        async def replay() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _too_large(scope: Scope, send: Send, length: bytes | None, limit: int) -> None:
        size = f"{int(length)} bytes" if length is not None and length.isdigit() else "the body"
        await _send_json(send, 413, shaped_error(_route(scope), 413, f"Request body too large: {size} is over this "
                                                 f"server's {limit}-byte limit (max_body_bytes); send less, or start "
                                                 "the server with a larger --max-body-bytes.",
                                                 code="request_too_large"))
