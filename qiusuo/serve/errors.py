"""Errors in the shape of the API a client called: OpenAI's, Ollama's or Anthropic's.

OpenAI's is `{"error": {"message", "type", "param", "code"}}`, Ollama's `{"error": "..."}` (under
/api/), Anthropic's `{"type": "error", "error": {"type", "message"}}` (under /v1/messages, its type
from the status as docs.anthropic.com "Errors" lists them). `shaped_error` gives the body for a path
(app.py's handlers and middlewares); `translating_errors` is the decorator of the Ollama and
Anthropic routes: they translate onto the chat route, so besides their own `APIError` they see the
chat route's `OpenAIError`, whose message then names the field as the client sent it
(`max_tokens` -> `options.num_predict`).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from fastapi.responses import JSONResponse

from .protocol import OpenAIError, error_body

Surface = Literal["openai", "ollama", "anthropic"]

ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                         503: "overloaded_error", 529: "overloaded_error"}


class APIError(Exception):
    """A client error of a translated API (Ollama's `OllamaError`, Anthropic's `AnthropicError`)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def surface(path: str) -> Surface:
    """Which API a path belongs to, for the shape of its errors."""
    if path == "/api" or path.startswith("/api/"):
        return "ollama"
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    return "openai"


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    kind = ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_shape(api: Surface, status: int, message: str, type: str = "invalid_request_error",
                param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    """An error body in `api`'s shape (`type`, `param` and `code` are OpenAI's only)."""
    if api == "ollama":
        return {"error": message}
    if api == "anthropic":
        return anthropic_error_body(status, message)
    return error_body(message, type, param, code)


def shaped_error(path: str, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    """An error body in the shape of the API `path` belongs to."""
    return error_shape(surface(path), status, message, type, param, code)


def renamed(e: OpenAIError, names: dict[str, str]) -> str:
    """The chat route's error message, its field named as the translated API names it."""
    return e.message.replace(e.param, names[e.param]) if e.param in names else e.message


def translating_errors(api: Surface, names: dict[str, str]):
    """Decorator of a translated API's route: its `APIError`s and the chat route's `OpenAIError`s (with
    the fields renamed by `names`: chat field -> the API's) become error responses in `api`'s shape."""
    def decorate(fn):
        @functools.wraps(fn)
        async def wrapped(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except APIError as e:
                status, message, headers = e.status, e.message, e.headers
            except OpenAIError as e:
                status, message, headers = e.status, renamed(e, names), e.headers
            return JSONResponse(error_shape(api, status, message), status_code=status, headers=headers)
        return wrapped
    return decorate
