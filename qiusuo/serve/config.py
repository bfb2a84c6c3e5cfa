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
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None  # Bearer key for every route but /health; None: no auth
    max_queue: int = 64  # sequences admitted but waiting for their first token; past it, 429
    max_body_bytes: int = 4 << 20  # larger request bodies get 413
    max_tokens_cap: int | None = None  # clamps max_tokens; None: the model's context
    max_output_budget: int = 1 << 17  # n x max_tokens x (1 + top_logprobs) per request; over it, 400
    default_thinking_budget: int | None = None  # requests that set no thinking_budget get this
    retry_after_s: int = 1  # the Retry-After header of a 429
    tool_call_parser: str | None = None  # hermes | deepseek_v3 | llama3_json; None: from the chat template

    def __post_init__(self):
        if not isinstance(self.served_model_name, str) or not self.served_model_name:
            raise ValueError("served_model_name must be a non-empty string (the name clients pass as `model`)")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty; give a key or None to turn auth off")
        if self.max_queue < 1:
            raise ValueError(f"max_queue={self.max_queue}: must be >= 1 (every new request waits for its first token)")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes={self.max_body_bytes}: must be >= 1024")
        if self.max_tokens_cap is not None and self.max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap={self.max_tokens_cap}: must be >= 1 (or None for no cap)")
        if self.max_output_budget < 1:
            raise ValueError(f"max_output_budget={self.max_output_budget}: must be >= 1")
        if self.default_thinking_budget is not None and self.default_thinking_budget < 0:
            raise ValueError(f"default_thinking_budget={self.default_thinking_budget}: must be >= 0 (or None)")
        if self.tool_call_parser is not None and self.tool_call_parser not in ("hermes", "deepseek_v3", "llama3_json"):
            raise ValueError(f"tool_call_parser={self.tool_call_parser!r}: use hermes, deepseek_v3 or llama3_json "
                             "(or leave it unset to choose from the chat template)")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s={self.retry_after_s}: must be >= 0")
