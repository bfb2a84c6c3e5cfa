"""What every generation route shares: the server's state and admission (the bounded queue), one
engine request's life with its metrics and its abort, SSE framing, disconnect handling and usage.
A request's parameters (max_tokens, sampling, output constraint, prompt checks) are read in
params.py, logprobs rendered in logprobs.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.requests import Request

from qiusuo.engine import CompletionOutput, RequestOutput, SamplingParams
from qiusuo.engine.reasoning import ThinkingBudget, ThinkState, count_reasoning, prompt_opens_think, thinking_limit

from .config import ServerConfig
from .core_client import EngineCoreClient
from .metrics import ServerMetrics
from .outputs import EngineDeadError, EngineLoadError
from .params import max_token_chars
from .protocol import OpenAIError


class ServerState:
    """Everything the routes need; `engine` is None until the engine first became ready."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.engine: EngineCoreClient | None = None
        self.load_error: BaseException | None = None
        self.on_fatal: Callable[[BaseException], None] | None = None  # see create_app
        self.num_waiting = 0  # requests admitted, no output yet
        self.num_running = 0  # requests admitted, outputs flowing
        self.num_waiting_seqs = 0  # their sequences (n each): what max_queue bounds
        self._max_prompt_chars: int | None = None
        self.started = time.time()  # the server's start: Ollama's modified_at when the registry has no entry
        self.metrics = ServerMetrics(config.served_model_name, lambda: (self.num_running, self.num_waiting),
                                     lambda: self.engine)

    def fatal(self, error: BaseException) -> None:
        """The engine can never serve (again): it could not load, or a thread engine failed."""
        if isinstance(error, EngineLoadError):
            self.load_error = error
        if self.on_fatal is not None:
            self.on_fatal(error)

    def health(self) -> tuple[str, str | None]:
        """(status, message): ok, loading, restarting or error."""
        if self.load_error is not None:
            return "error", str(self.load_error)
        if self.engine is None:
            return "loading", None
        if self.engine.dead is not None:
            return "error", str(self.engine.dead)
        if self.engine.restarting:
            return "restarting", f"the engine is restarting (restart {self.engine.num_restarts})"
        return "ok", None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_prompt_chars(self) -> int | None:
        """Characters beyond which a text cannot fit the context whatever it says (None: unknown)."""
        if self._max_prompt_chars is None and self.engine is not None:
            longest = max_token_chars(self.tokenizer)
            self._max_prompt_chars = self.max_model_len * longest if longest else 0
        return self._max_prompt_chars or None

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def ready(self) -> EngineCoreClient:
        if self.engine is None:
            msg = ("the model is still loading" if self.load_error is None
                   else f"the model failed to load: {self.load_error}")
            raise OpenAIError(503, msg, "service_unavailable", code="model_loading")
        if self.engine.dead is not None:
            raise OpenAIError(503, f"the engine stopped: {self.engine.dead}", "service_unavailable")
        if self.engine.restarting:
            raise OpenAIError(503, "the engine is restarting after a crash; retry shortly", "service_unavailable",
                              code="engine_restarting", headers={"Retry-After": str(self.config.retry_after_s)})
        return self.engine

    @property
    def lora_names(self) -> list[str]:
        """The LoRA adapters served on the base (`qiusuo serve --lora-modules`), known once the engine is ready."""
        return self.engine.lora_names if self.engine is not None else []

    def check_model(self, name: str) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base model); 404 for any other name.
        An adapter is asked for by its own name, as in vLLM (`--lora-modules NAME=PATH`)."""
        if name == self.config.served_model_name:
            return None
        if name in self.lora_names:
            return name
        served = ", ".join(f"`{n}`" for n in [self.config.served_model_name, *self.lora_names])
        raise OpenAIError(404, f"The model `{name}` does not exist; this server serves {served}.", param="model",
                          code="model_not_found")

    def admit(self, num_seqs: int, num_requests: int = 1) -> None:
        """Reserve `num_seqs` waiting places (every sample of every prompt is a row of the engine's batch)
        or raise 429 (400 if they could never fit); each `EngineRequest` hands its own back."""
        limit = self.config.max_queue
        if num_seqs > limit:
            raise OpenAIError(400, f"This request has {num_seqs} sequences (n x prompts) but the server admits "
                              f"at most {limit} at once (max_queue); lower n or send fewer prompts per request.",
                              param="n", code="too_many_sequences")
        if self.num_waiting_seqs + num_seqs > limit:
            self.metrics.rejected.labels(self.config.served_model_name).inc()
            raise OpenAIError(429, f"The server is busy: {self.num_waiting_seqs} sequences are waiting "
                              f"(max_queue={limit}); retry later.", "rate_limit_error",
                              code="server_busy", headers={"Retry-After": str(self.config.retry_after_s)})
        self.num_waiting_seqs += num_seqs
        self.num_waiting += num_requests


async def start_all(requests: list["EngineRequest"]) -> None:
    """Start every request, or close them all and raise the first error."""
    try:
        for r in requests:
            await r.start()
    except BaseException:
        for r in requests:
            r.close()
        raise


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------- one engine request
class EngineRequest:
    """One engine request from admission to its last output: queue bookkeeping, metrics, abort."""

    def __init__(self, state: ServerState, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 thinking_budget: int | None, arrival: float, answer_reserve: int = 0, lora_name: str | None = None):
        """`answer_reserve` > 0: a think block still open when only that many tokens of max_tokens are
        left is closed, so the answer gets them (chat routes; raw completions pass 0)."""
        self.state, self.request_id, self.prompt_ids = state, request_id, prompt_ids
        self.params, self.thinking_budget, self.arrival = params, thinking_budget, arrival
        self.answer_reserve = answer_reserve
        self.lora_name = lora_name  # the LoRA adapter it runs with (None: the base)
        self.opened_by_prompt = prompt_opens_think(prompt_ids, getattr(state.tokenizer, "think_start_id", None),
                                                   getattr(state.tokenizer, "think_end_id", None))
        # The same limit the engine enforces (core_client builds it from the same arguments): it tells
        # afterwards whether a sample's reasoning was cut.
        self.limit: ThinkingBudget | None = thinking_limit(state.tokenizer, thinking_budget, params.max_tokens,
                                                           answer_reserve, self.opened_by_prompt)
        self.final: RequestOutput | None = None
        self.tool_parser: str | None = None  # chat with tools: the format its answer is parsed in (serve/tools.py)
        self._stream = None
        self._submitted = self._accepted = False
        self._phase = "waiting"  # -> running -> done
        self._first: float | None = None
        self._last: float | None = None

    async def start(self) -> None:
        """Submit and wait for the engine's acceptance: a 400 here comes before any response bytes."""
        engine = self.state.ready()
        try:
            self._stream = engine.submit(self.request_id, self.prompt_ids, self.params, self.thinking_budget,
                                         self.opened_by_prompt, self.answer_reserve, self.lora_name)
            self._submitted = True
            await self._stream.accepted()
        except ValueError as e:
            raise OpenAIError(400, str(e)) from None
        except EngineDeadError as e:
            raise OpenAIError(503, str(e), "service_unavailable") from None
        self._accepted = True

    @property
    def first_token_time(self) -> float | None:
        """`time.monotonic()` when the first token arrived (None: none yet)."""
        return self._first

    def reasoning_cut(self, out: CompletionOutput) -> bool:
        """The sample's reasoning was cut: its think block closed by the budget or the answer reserve,
        or its output ended inside the block."""
        if self.limit is not None:
            return self.limit.cut(out.token_ids, out.finish_reason)
        return (out.finish_reason == "length"
                and ThinkState.for_prompt(self.state.tokenizer, self.prompt_ids).scan(out.token_ids).inside)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """The request's outputs after `start`; leaving early (disconnect, error) aborts it."""
        state = self.state
        try:
            async for out in self._stream:
                now = time.monotonic()
                if self._phase == "waiting" and any(o.token_ids for o in out.outputs):
                    self._set_phase("running")
                    self._first = now
                    state.metrics.ttft.labels(state.config.served_model_name).observe(now - self.arrival)
                self._last = now
                if out.finished:
                    self.final = out
                yield out
        except EngineDeadError as e:
            raise OpenAIError(503, str(e), "service_unavailable") from None  # retryable: a new engine may serve it
        finally:
            self.close()

    def _set_phase(self, phase: str) -> None:
        state = self.state
        if self._phase == "waiting":
            state.num_waiting -= 1
            state.num_waiting_seqs -= self.params.n
        elif self._phase == "running":
            state.num_running -= 1
        if phase == "running":
            state.num_running += 1
        self._phase = phase

    def close(self) -> None:
        """Idempotent; every EngineRequest must end here (it hands back its place in the queue)."""
        if self._phase == "done":
            return
        self._set_phase("done")
        state, m, name = self.state, self.state.metrics, self.state.config.served_model_name
        if self.final is None:  # the client left (or an error): stop generating and free the cache
            if self._submitted and state.engine is not None:
                state.engine.abort(self.request_id)  # queued after the add: commands apply in order
            if self._accepted:
                m.finished("abort")
            return
        out = self.final
        num_out = out.num_completion_tokens
        m.prompt_tokens.labels(name).inc(out.num_prompt_tokens)
        m.generation_tokens.labels(name).inc(num_out)
        m.reasoning_tokens.labels(name).inc(sum(count_reasoning(state.tokenizer, self.prompt_ids, o.token_ids)
                                                for o in out.outputs))
        m.e2e.labels(name).observe((self._last or time.monotonic()) - self.arrival)
        per_sample = max((len(o.token_ids) for o in out.outputs), default=0)
        if self._first is not None and per_sample > 1:
            m.tpot.labels(name).observe((self._last - self._first) / (per_sample - 1))
        for o in out.outputs:
            m.finished(o.finish_reason or "abort")


async def merge(gens: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as items arrive; (which, item)."""
    if len(gens) == 1:
        async for item in gens[0]:
            yield 0, item
        return
    pending = {asyncio.ensure_future(g.__anext__()): i for i, g in enumerate(gens)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                try:
                    item = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(gens[i].__anext__())] = i
                yield i, item
    finally:
        for fut in pending:
            fut.cancel()
        for g in gens:
            await g.aclose()


# ---------------------------------------------------------------------- transport
def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"


async def wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`; if the client hangs up first, cancel it (its requests abort) and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    return None


def usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int, cached_tokens: int,
          reasoning_truncated: bool | None = None) -> dict[str, Any]:
    """OpenAI's usage; `reasoning_truncated` (chat only): some sample's think block was closed by the
    thinking budget or the answer reserve, or its output ended inside it."""
    details: dict[str, Any] = {"reasoning_tokens": reasoning_tokens}
    if reasoning_truncated is not None:
        details["reasoning_truncated"] = reasoning_truncated
    return {
        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": details,
    }

