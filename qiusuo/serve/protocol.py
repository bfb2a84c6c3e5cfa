"""The request bodies, with OpenAI's field names, and OpenAI's error shape.

Field bounds are OpenAI's where it states them (temperature [0, 2], top_logprobs [0, 20],
completions logprobs [0, 5]). Lists that the engine scans on every generated token are capped,
so one request cannot slow every other one: at most 16 stop strings of at most 256 characters
and 128 stop token ids (OpenAI allows 4 stop strings; 500k of them in a 4 MiB body once took
12.3 s of engine time). Unknown fields are ignored, as vLLM does, so newer clients keep
working; fields we accept but cannot honour (penalties, tools, suffix, echo) are refused with a
400 that names them rather than silently ignored. vLLM's extra sampling fields (top_k,
ignore_eos, stop_token_ids, ...) are accepted too, plus `thinking_budget`, and vLLM's
`structured_outputs` ({json | regex | choice | grammar | json_object, disable_any_whitespace}) with the
older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` spellings. An assistant
message's earlier reasoning may come as `reasoning_content` (DeepSeek, SGLang) or `reasoning` (vLLM,
Ollama's /v1): both are accepted, since clients echo back whichever name they were given.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 128


class OpenAIError(Exception):
    """An error a user caused (or 5xx for ours), rendered as OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Request):
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    # "developer" is OpenAI's newer name for "system"; "tool" is refused by templates that lack it.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None  # earlier turns' reasoning, under either name (vLLM #38488)
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool result: which call it answers

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content


class _SamplingFields(_Request):
    """Fields chat and completions share."""

    model: str
    n: int = Field(1, ge=1, le=64)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's; engine.StructuredOutputsParams fields
    guided_json: str | dict[str, Any] | None = None  # vLLM's older names for structured_outputs
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _cap_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(strings)} stop strings: at most {MAX_STOP_STRINGS} are allowed")
        longest = max((len(x) for x in strings), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string of {longest} characters: at most {MAX_STOP_CHARS} are allowed")
        return stop

    @field_validator("stop_token_ids")
    @classmethod
    def _cap_stop_token_ids(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"{len(ids)} stop token ids: at most {MAX_STOP_TOKEN_IDS} are allowed")
        return ids

    def unsupported(self) -> list[str]:
        """Fields set to values the engine cannot honour."""
        bad = [f for f in ("presence_penalty", "frequency_penalty") if getattr(self, f)]
        if self.logit_bias:
            bad.append("logit_bias")
        return bad


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    thinking_budget: int | None = Field(None, ge=0)  # max reasoning tokens, then `</think>` is forced
    # OpenAI's; mapped to a thinking budget (REASONING_EFFORT_BUDGETS); thinking_budget wins when both are set
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Any] | None = Field(None, max_length=128)
    tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's completions default
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.echo:
            bad.append("echo")
        if self.suffix:
            bad.append("suffix")
        if self.best_of is not None and self.best_of != self.n:
            bad.append("best_of")
        return bad
