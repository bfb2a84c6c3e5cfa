"""`AsyncEngine`: the `LLMEngine` on one background thread, fed and drained from an asyncio loop.

The engine is not thread-safe and its `step()` blocks for a whole forward pass, so one thread owns
it: it takes commands (add, abort) from a thread-safe queue between steps, steps while there is
work, and hands each step's outputs to the event loop in one `call_soon_threadsafe` call. The
event loop never calls the engine and never waits on it (nanochat's endpoint did, see STYLE.md).

`ProcessEngine` (engine_process.py) is the same surface with the engine in its own process.

Each request gets a `RequestStream`: an asyncio queue that receives first an acknowledgement
(or the `ValueError` the engine raised for it), then its `RequestOutput`s until the last one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from qiusuo.engine import LLMEngine, RequestOutput, SamplingParams

from qiusuo.engine.reasoning import with_thinking_budget

log = logging.getLogger("qiusuo.serve")

_ACK = object()


def take_commands(cmds: queue.SimpleQueue, block: bool) -> list:
    """The commands waiting in `cmds`; when `block` (the engine is idle) wait for at least one."""
    out = [cmds.get()] if block else []
    while True:
        try:
            out.append(cmds.get_nowait())
        except queue.Empty:
            return out


class EngineDeadError(RuntimeError):
    """The engine thread failed; requests in flight get this, new ones are refused."""


class RequestStream:
    """The event-loop end of one request."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    async def accepted(self) -> None:
        """Wait until the engine took the request; raises its ValueError if it refused it."""
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert item is _ACK, f"expected the acknowledgement first, got {item!r}"

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        """The outputs in order. Outputs that queued up while the event loop was busy come as one
        (the latest, with the deltas joined): under load the loop does less work per token."""
        while not self.finished:
            item = await self.queue.get()
            pending_error = None
            while not isinstance(item, BaseException) and not item.finished and not self.queue.empty():
                nxt = self.queue.get_nowait()
                if isinstance(nxt, BaseException):
                    pending_error = nxt
                    break
                item = _join(item, nxt)
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item
            if pending_error is not None:
                self.finished = True
                raise pending_error


def _join(older: RequestOutput, newer: RequestOutput) -> RequestOutput:
    """`newer` with `older`'s deltas in front (every other field is cumulative already)."""
    previous = {o.index: o for o in older.outputs}
    for o in newer.outputs:
        p = previous.get(o.index)
        if p is not None:
            o.delta_text = p.delta_text + o.delta_text
            o.delta_token_ids = p.delta_token_ids + o.delta_token_ids
    return newer


@dataclass
class EngineSnapshot:
    """What the engine thread publishes after each step (read by /metrics)."""

    num_blocks: int = 0
    num_used_blocks: int = 0
    num_preemptions: int = 0
    num_running_seqs: int = 0
    num_waiting_seqs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> "EngineSnapshot":
        """From `LLMEngine.stats()` (read in the engine thread, or sent by the engine process)."""
        return cls(num_blocks=stats["num_blocks"], num_used_blocks=stats["num_used_blocks"],
                   num_preemptions=stats["num_preemptions"], num_running_seqs=stats["num_running"],
                   num_waiting_seqs=stats["num_waiting"], extra=stats)

    @property
    def kv_cache_usage(self) -> float:
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model.config.vocab_size
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self.dead: BaseException | None = None
        self.snapshot = EngineSnapshot()
        self._publish()

    # ------------------------------------------------------------------ lifecycle (event loop)
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="qiusuo-engine", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        """The engine can still serve: its thread runs and did not fail."""
        return self.dead is None and self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        self._closing = True
        self._cmds.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ requests (event loop)
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               thinking_budget: int | None = None, opened_by_prompt: bool = False) -> RequestStream:
        if self.dead is not None:
            raise EngineDeadError(f"the engine thread stopped: {self.dead!r}")
        stream = RequestStream(request_id)
        params = with_thinking_budget(params, thinking_budget, self.tokenizer, opened_by_prompt)
        self._cmds.put(("add", stream, prompt_ids, params))
        return stream

    def abort(self, request_id: str) -> None:
        self._cmds.put(("abort", request_id))

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._closing:
                for cmd in take_commands(self._cmds, block=not engine.has_unfinished_requests()):
                    self._apply(cmd)
                if self._closing or not engine.has_unfinished_requests():
                    self._publish()
                    continue
                outputs = engine.step()
                batch = []
                for out in outputs:
                    stream = self._streams.get(out.request_id)
                    if out.finished:
                        self._forget(out.request_id)
                    if stream is not None:
                        batch.append((stream, out))
                self._publish()
                if batch:
                    self._post(_deliver, batch)
        except Exception as e:  # an engine bug: fail everyone in flight rather than hang them
            log.exception("the engine thread failed")
            self.dead = e
            err = EngineDeadError(f"the engine failed: {e!r}")
            self._post(_deliver, [(s, err) for s in self._streams.values()])
            self._streams.clear()

    def _apply(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, stream, prompt_ids, params = cmd
            rid = stream.request_id
            try:
                self.engine.add_request(rid, prompt_ids, params, add_special_tokens=False)
            except ValueError as e:
                self._post(_deliver, [(stream, e)])
                return
            self._streams[rid] = stream
            self._post(_deliver, [(stream, _ACK)])
        elif kind == "abort":
            self.engine.abort_request(cmd[1])
            self._forget(cmd[1])

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def _post(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self._closing = True

    def _publish(self) -> None:
        # one reference swap: readers on other threads see a whole snapshot
        self.snapshot = EngineSnapshot.from_stats(self.engine.stats())


def _deliver(batch: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in batch:
        stream.queue.put_nowait(item)
