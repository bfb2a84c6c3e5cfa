"""`SamplingParams`: how one request is sampled and when it stops (vLLM's names and defaults).

Every rule a user can break is checked here, in `__post_init__`, so a bad request fails with a
`ValueError` at `generate`/`add_request` time and never reaches the running batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .guided import StructuredOutputsParams

# vLLM's per-request logits processor: (output token ids so far, logits row (V,)) -> logits row.
# It sees the raw logits before temperature and filtering, and its result is what the sampler and
# the returned logprobs use. It must be stateless (it is shared by the request's n samples and
# called again after a preemption), e.g. the server's thinking budget. It returns the row it was
# given when it changes nothing (then nothing is copied), else edits it in place or returns a new row
# (sampler.apply_logits_processors).
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    n: int = 1  # samples per prompt (a GRPO group); they share the prompt's KV blocks
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    max_tokens: int | None = 16  # None = until the context is full
    stop: str | list[str] | None = None  # stop strings, stripped from the text (as vLLM)
    stop_token_ids: list[int] | None = None  # extra stop tokens (kept in token_ids, not in text)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    seed: int | None = None  # same seed -> same tokens, whatever else is in the batch
    logprobs: int | None = None  # None: off; 0: the sampled token's logprob; k: plus the top k
    skip_special_tokens: bool = True
    detokenize: bool = True
    logits_processors: list[LogitsProcessor] | None = None
    # JSON schema / regex / choice / grammar the output must match (guided.py); a dict of its fields works too
    structured_outputs: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self):
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n={self.n!r}: the number of samples must be an integer >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]; use 1 to turn nucleus sampling off")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 1, or 0/-1 to turn it off")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            raise ValueError(f"max_tokens={self.max_tokens!r}: must be a positive integer (or None for the context)")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs={self.logprobs!r}: must be None or an integer >= 0")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}: must be an integer or None")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop={self.stop!r}: stop strings must be non-empty strings")
        self.stop_strings = stop
        ids = list(self.stop_token_ids or [])
        if any(not isinstance(t, int) or t < 0 for t in ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r}: must be non-negative token ids")
        self.stop_token_ids = ids
        procs = list(self.logits_processors or [])
        if not all(callable(f) for f in procs):
            raise ValueError("logits_processors must be callables f(output_token_ids, logits) -> logits")
        self.logits_processors = procs
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams (or a dict of its fields)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
