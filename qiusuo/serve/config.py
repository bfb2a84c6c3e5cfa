"""`ServerConfig`: the server's knobs (name, auth, back-pressure, limits), validated.

The limits are what keeps one authenticated request from slowing everyone (all checked before the
engine sees the request, each refusal a 4xx in OpenAI's error shape):
- `max_queue` counts SEQUENCES (a request with n=4 and 3 prompts takes 12 places), since each is
  one row of the engine's batch; a request that could never fit is a 400, a full queue a 429.
- `max_tokens_cap` defaults to the model's context (no request runs past it anyway).
- `max_output_budget` bounds n x max_tokens x (1 + top_logprobs) summed over a request's prompts:
  the tokens and logprob entries it can make the server build and send. A 152-byte request
  (n=64, top_logprobs=20, max_tokens=400) once produced a 31 MiB response and +450 MB RSS;
  the default 131072 (2^17) lets n=1 fill a 128k context, and answers that request with 400.
  A request that sets no max_tokens gets the rest of the context, lowered to fit the budget.
- `max_body_bytes` bounds the request body, checked on Content-Length and counted while the body
  streams in, before any of it is parsed: JSON parsing holds the GIL, so a large body stalls every
  other request (a 3.6 MB body of 400k stop strings cost the event loop 0.1-0.5 s per request).
  The default (None) is sized from the model's context: 64 KiB + 32 bytes per context token
  (`body_limit_for_context`), which holds a prompt filling the whole context as JSON text even
  with every non-ASCII character escaped as `\\uXXXX` (about 12 bytes per token) or as a token-id
  array (at most 8 bytes per id): 128 KiB for a 2k context, 4.06 MiB for 128k. Larger batches
  of prompts in one body need an explicit limit.
- `answer_reserve_tokens`: a chat whose think block is still open when only
  min(answer_reserve_tokens, max_tokens // 4) tokens are left gets `</think>` forced, so the answer
  still has those tokens (usage `reasoning_truncated` says so).
- `stream_send_timeout_s`: a streaming client that accepts no bytes for this long is disconnected
  and its request aborted (streaming.py), so a reader that never reads holds an engine slot for
  at most that long, not until max_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Literal

from qiusuo.fields import check_choices, option

ToolCallParser = Literal["hermes", "deepseek_v3", "llama3_json"]  # serve/tools.py's parsers

BODY_FIXED_BYTES = 64 << 10  # the request's JSON besides the prompt: parameters, message framing
BODY_BYTES_PER_TOKEN = 32  # a context token as JSON text (escaped non-ASCII: ~12) or an id (<= 8)
BODY_BYTES_WHILE_LOADING = 1 << 20  # the context is unknown until the model loads (routes answer 503)


def body_limit_for_context(max_model_len: int) -> int:
    """The default `max_body_bytes` for a model with this context (see the module docstring)."""
    return BODY_FIXED_BYTES + BODY_BYTES_PER_TOKEN * max_model_len


@dataclass
class ServerConfig:
    served_model_name: str = option(help="the name clients pass as `model`")
    api_key: str | None = option(None, "Bearer key for every route but /health; None: no auth")
    max_queue: int = option(64, "sequences (n per prompt) admitted but waiting for their first token; past it, "
                                "429 with Retry-After")
    max_body_bytes: int | None = option(None, "largest request body in bytes; over it, 413 before parsing "
                                              "(default: 64 KiB + 32 bytes per context token)")
    max_tokens_cap: int | None = option(None, "upper bound on any request's max_tokens (default: the model's "
                                              "context)")
    max_output_budget: int = option(1 << 17, "per request, n x max_tokens x (1 + top_logprobs) summed over its "
                                             "prompts; over it, 400")
    default_thinking_budget: int | None = option(None, "default max reasoning tokens per request (a request's "
                                                       "thinking_budget wins)", flag="--thinking-budget")
    retry_after_s: int = option(1, "the Retry-After header of a 429, in seconds", flag="--retry-after")
    answer_reserve_tokens: int = option(256, "answer tokens kept when max_tokens would end a chat inside its "
                                             "think block: `</think>` is forced with min(this, max_tokens // 4) "
                                             "tokens left (0: never)")
    tool_call_parser: ToolCallParser | None = option(None, "tool-call format of the model's answers (vLLM's "
                                                           "names; default: from the chat template)")
    stream_send_timeout_s: float | None = option(60.0, "seconds a streaming client may read nothing before it is "
                                                       "disconnected and its request aborted",
                                                 flag="--stream-send-timeout")

    def __post_init__(self):
        check_choices(self)
        if not isinstance(self.served_model_name, str) or not self.served_model_name:
            raise ValueError("served_model_name must be a non-empty string (the name clients pass as `model`)")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty; give a key or None to turn auth off")
        if self.max_queue < 1:
            raise ValueError(f"max_queue={self.max_queue}: must be >= 1 (every new request waits for its first token)")
        if self.max_body_bytes is not None and self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes={self.max_body_bytes}: must be >= 1024 (or None: sized from the "
                             "model's context)")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap={self.max_tokens_cap}: must be >= 1 (or None for no cap)")
        if self.max_output_budget < 1:
            raise ValueError(f"max_output_budget={self.max_output_budget}: must be >= 1")
        if self.default_thinking_budget is not None and self.default_thinking_budget < 0:
            raise ValueError(f"default_thinking_budget={self.default_thinking_budget}: must be >= 0 (or None)")
        if self.answer_reserve_tokens < 0:
            raise ValueError(f"answer_reserve_tokens={self.answer_reserve_tokens}: must be >= 0 (0: never close "
                             "the think block early)")
        if self.stream_send_timeout_s is not None and not self.stream_send_timeout_s > 0:
            raise ValueError(f"stream_send_timeout_s={self.stream_send_timeout_s}: must be > 0 (or None: wait forever)")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s={self.retry_after_s}: must be >= 0")
