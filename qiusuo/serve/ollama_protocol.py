"""Ollama's API request bodies (field names from Ollama's docs/api.md and its Python client's types)
and its client error, rendered as `{"error": "..."}` with the HTTP status (errors.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import APIError

# Options the engine cannot honour, with the value that means "off" (any other is refused).
_NEUTRAL = {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "mirostat": 0,
            "tfs_z": 1.0, "typical_p": 1.0, "min_p": 0.0}


class OllamaError(APIError):
    """A client error under /api/, in Ollama's shape."""


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


class BaseGenerateRequest(_Body):
    """What /api/chat and /api/generate share (the ollama client's name)."""

    model: str = Field(min_length=1)
    stream: bool = True  # Ollama's default
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    think: Think = None
    keep_alive: float | str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ChatRequest(BaseGenerateRequest):
    messages: list[Message] = Field(default_factory=list)
    tools: list[Any] | None = None


class GenerateRequest(BaseGenerateRequest):
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
