"""What the engine client hands the routes, whichever transport runs the engine: `RequestStream`
(one request's outputs), `EngineSnapshot` (the engine's last stats) and the two engine errors.

A `RequestStream` is bounded whatever its reader does. The engine core sends each request's
output as a delta (new text, token ids and logprobs; `core.RequestDelta`); the stream keeps the
request's cumulative text, ids and logprobs once, plus at most ONE pending delta: deltas that
arrive while the reader is busy (or stalled: a client that stops reading its SSE stream) are
merged into it, as vLLM V1's `RequestOutputCollector` does. Memory is O(tokens) per request,
never O(tokens^2) as a queue of cumulative copies was, and under load the reader does less work
per token (one output for several steps).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from qiusuo.engine import CompletionOutput, RequestOutput

if TYPE_CHECKING:
    from .core import RequestDelta


class EngineDeadError(RuntimeError):
    """The engine stopped (crashed, was killed, or the server is shutting down): requests in flight
    get this, new ones are refused until it is back (an engine process is restarted)."""


class EngineLoadError(RuntimeError):
    """The engine could not be built (the loader raised, or its process exited before it was ready)."""


@dataclass
class EngineSnapshot:
    """The engine's stats after its last step (read by /metrics)."""

    num_blocks: int = 0
    num_used_blocks: int = 0
    num_preemptions: int = 0
    num_running_seqs: int = 0
    num_waiting_seqs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> "EngineSnapshot":
        """From `LLMEngine.stats()`."""
        return cls(num_blocks=stats["num_blocks"], num_used_blocks=stats["num_used_blocks"],
                   num_preemptions=stats["num_preemptions"], num_running_seqs=stats["num_running"],
                   num_waiting_seqs=stats["num_waiting"], extra=stats)

    @property
    def kv_cache_usage(self) -> float:
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0


@dataclass
class _Pending:
    """One sample's deltas not taken yet, merged in place (amortised O(1) per token)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Sample:
    """One sample's cumulative output, kept once per request."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestStream:
    """The event-loop end of one request: `await accepted()`, then `async for out in stream`.

    The engine client calls `accept`, `put` and `fail`; they never block and never queue more than
    one merged delta. Each output is the cumulative `RequestOutput` (every sample, with the deltas
    since the previous output the reader took). Its `token_ids` and `logprobs` lists are the
    stream's own, which grow as later outputs are taken: read them before taking the next one.
    """

    def __init__(self, request_id: str, prompt_ids: list[int]):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.finished = False
        self._accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        self._wakeup = asyncio.Event()
        self._pending: dict[int, _Pending] = {}  # merged deltas the reader has not taken yet
        self._pending_finished = False
        self._num_cached_tokens = 0
        self._error: BaseException | None = None
        self._samples: dict[int, _Sample] = {}

    # ------------------------------------------------------------------ the engine client's side
    def accept(self, error: BaseException | None = None) -> None:
        """The engine took the request (or refused it with `error`, a ValueError)."""
        if self._accepted.done():
            return
        if error is None:
            self._accepted.set_result(None)
        else:
            self._accepted.set_exception(error)
            self._accepted.exception()  # retrieved: a request aborted meanwhile never awaits it
            self.finished = True

    def put(self, delta: "RequestDelta") -> None:
        """Merge one step's delta into the pending one (O(delta), whatever the reader does)."""
        for s in delta.samples:
            p = self._pending.get(s.index)
            if p is None:
                p = self._pending[s.index] = _Pending()
            if s.delta_text:
                p.text.append(s.delta_text)
            p.token_ids.extend(s.delta_token_ids)
            if s.new_logprobs is not None:
                if p.logprobs is None:
                    p.logprobs = []
                p.logprobs.extend(s.new_logprobs)
            p.cumulative_logprob, p.finish_reason, p.stop_reason = s.cumulative_logprob, s.finish_reason, s.stop_reason
        self._pending_finished = delta.finished
        self._num_cached_tokens = delta.num_cached_tokens
        self._wakeup.set()

    def fail(self, error: BaseException) -> None:
        """End the request with `error` (after the outputs already pending)."""
        if not self._accepted.done():
            self.accept(error)
            return
        self._error = error
        self._wakeup.set()

    # ------------------------------------------------------------------ the reader's side
    async def accepted(self) -> None:
        """Wait until the engine took the request; raises its ValueError if it refused it."""
        await self._accepted

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self._pending:
                out = self._take()
                self.finished = out.finished
                yield out
            if self._error is not None and not self.finished:
                self.finished = True
                raise self._error

    def _take(self) -> RequestOutput:
        pending, self._pending = self._pending, {}
        outs = []
        for index in sorted(set(self._samples) | set(pending)):
            s = self._samples.get(index)
            if s is None:
                s = self._samples[index] = _Sample()
            d = pending.get(index)
            delta_text, delta_ids = "", []
            if d is not None:
                delta_text, delta_ids = "".join(d.text), d.token_ids
                s.text += delta_text
                s.token_ids.extend(delta_ids)
                if d.logprobs is not None:
                    if s.logprobs is None:
                        s.logprobs = []
                    s.logprobs.extend(d.logprobs)
                s.cumulative_logprob, s.finish_reason, s.stop_reason = (d.cumulative_logprob, d.finish_reason,
                                                                        d.stop_reason)
            outs.append(CompletionOutput(index, s.text, s.token_ids, s.cumulative_logprob, s.logprobs,
                                         s.finish_reason, s.stop_reason, delta_text, delta_ids))
        return RequestOutput(self.request_id, None, self.prompt_ids, outs, self._pending_finished,
                             self._num_cached_tokens)
