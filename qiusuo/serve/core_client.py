"""`EngineCoreClient`: the API process's end of the engine core, with two transports.

    client = EngineCoreClient.make_client(source, multiprocess=True)   # as vLLM's make_client
    client.start(loop); await client.ready()
    stream = client.submit(request_id, prompt_ids, params); await stream.accepted()
    async for out in stream: ...                                        # client.abort(request_id)

- `InprocClient`: the core loop (core.py) on a thread of this process; it emits with
  `loop.call_soon_threadsafe`. `source` may be a live engine (what Ray Serve replicas and tests
  pass). The engine thread and the event loop then share one GIL.
- `MPClient`: the core loop in a spawned child process (vLLM V1's engine-core process), which
  frees the event loop from the engine's GIL: at 32 streaming clients the thread version's
  engine CPU per token rose from 0.08 ms (offline) to 0.11 ms and served throughput stalled at
  68-70 % of offline (bench/serve.py). `source` must be a picklable zero-argument loader.
  Commands go down one pipe, one `StepOutput` per engine step comes back up the other, read
  with `loop.add_reader` (no thread). EOF either way ends the other side: the child exits when
  this process closes its pipe or dies (no orphans).

Everything else is shared and lives here once: request bookkeeping, acks and refusals, feeding
each request's `RequestStream`, the stats snapshot, and what happens when the core stops.

When the core stops. Requests in flight always get `EngineDeadError`. Then:
- it never became ready (the loader raised, or the child died while loading): `ready()` raises
  `EngineLoadError` and the client calls `on_fatal`; `qiusuo serve` exits 1 with the error.
- an engine PROCESS that was serving died (killed, OOM, an engine bug): the client respawns it
  after a backoff (0.5 s doubling to 30 s; back to 0.5 s once a child has served for 60 s),
  counting `num_restarts`; new requests get 503 until the new child is ready. A respawned
  child that fails to LOAD is fatal as above (the checkpoint changed under us: a supervisor
  should see it).
- an engine THREAD that was serving raised: the engine object may be half-way through a step,
  so it is not reused; the client is dead (503 for good; Ray Serve's health check replaces the
  replica).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import queue
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

from qiusuo.engine import SamplingParams
from qiusuo.engine.reasoning import with_thinking_budget

from .core import (PROTOCOL, AbortRequest, AddRequest, EngineFailed, LoadFailed, Ready, Shutdown, StepOutput,
                   check_loader, engine_core_main, run_engine_core)
from .outputs import EngineDeadError, EngineLoadError, EngineSnapshot, RequestStream

log = logging.getLogger("qiusuo.serve")

RESTART_BACKOFF_S = (0.5, 30.0)  # first delay, cap; doubles per crash in a row
RESTART_RESET_S = 60.0  # a child that served this long resets the backoff


class EngineCoreClient:
    """The engine as the routes see it: `submit`, `abort`, `snapshot`, `ready()`, `is_alive()`."""

    @staticmethod
    def make_client(source: Any, *, multiprocess: bool) -> "EngineCoreClient":
        """`multiprocess`: the engine core in its own process (`source` a picklable loader), else on a
        thread of this one (`source` an engine, an `LLM`, or a loader)."""
        return MPClient(source) if multiprocess else InprocClient(source)

    def __init__(self, source: Any):
        self.source = source
        self.tokenizer = None  # known once ready
        self.max_model_len = 0
        self.vocab_size = 0
        self.lora_names: list[str] = []  # the adapters the engine serves (`model` names besides the base)
        self.snapshot = EngineSnapshot()
        self.dead: BaseException | None = None  # set for good: nothing will serve again
        self.num_restarts = 0
        self.on_fatal: Callable[[BaseException], None] | None = None  # the core can never serve (again)
        self._requests: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self._is_ready = False  # the current core is serving
        self._closing = False
        self._failure: str | None = None  # the core's last LoadFailed / EngineFailed message
        self._ready_since = 0.0
        self._restart_handle: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ lifecycle (event loop)
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ready = loop.create_future()
        self._start_core()

    async def ready(self) -> None:
        """Wait for the first core to be ready; raises `EngineLoadError` when it could not load."""
        await asyncio.shield(self._ready)

    @property
    def restarting(self) -> bool:
        """A core died and its replacement is not ready yet."""
        return self.num_restarts > 0 and not self._is_ready and self.dead is None and not self._closing

    def is_alive(self) -> bool:
        """The engine serves now."""
        return self.dead is None and self._is_ready and self._core_alive()

    # ------------------------------------------------------------------ requests (event loop)
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               thinking_budget: int | None = None, opened_by_prompt: bool = False,
               answer_reserve: int = 0, lora_name: str | None = None) -> RequestStream:
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        if self._closing or not self._is_ready:
            raise EngineDeadError("the engine is restarting" if self.restarting else "the engine is not running")
        stream = RequestStream(request_id, prompt_ids)
        params = with_thinking_budget(params, thinking_budget, self.tokenizer, opened_by_prompt, answer_reserve)
        self._requests[request_id] = stream
        try:
            self._send(AddRequest(request_id, prompt_ids, params, lora_name))
        except OSError as e:  # the child is gone and we have not read its EOF yet: that fails the rest
            del self._requests[request_id]
            stream.fail(EngineDeadError(f"the engine process is gone: {e!r}"))
        return stream

    def abort(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is None or not self._is_ready:
            return  # finished (the engine forgot it too), refused, or no core to tell
        try:
            self._send(AbortRequest(request_id))
        except OSError:
            pass  # the child is gone; its EOF fails everything else

    # ------------------------------------------------------------------ messages (event loop)
    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, StepOutput):
            self._on_step(msg)
        elif isinstance(msg, Ready):
            self._on_ready(msg)
        elif isinstance(msg, (LoadFailed, EngineFailed)):
            self._failure = msg.message  # the core stops next; `_on_core_exit` acts on it

    def _on_ready(self, msg: Ready) -> None:
        self.tokenizer, self.max_model_len, self.vocab_size = msg.tokenizer, msg.max_model_len, msg.vocab_size
        self.lora_names = list(msg.lora_names)
        self.snapshot = EngineSnapshot.from_stats(msg.stats)
        self._is_ready, self._failure = True, None
        self._ready_since = time.monotonic()
        if self.num_restarts:
            log.warning("the engine is back (restart %d)", self.num_restarts)
        if not self._ready.done():
            self._ready.set_result(None)

    def _on_step(self, msg: StepOutput) -> None:
        requests = self._requests
        for rid in msg.acks:
            stream = requests.get(rid)
            if stream is not None:  # else aborted before the core saw the add
                stream.accept()
        for rid, message in msg.errors:
            stream = requests.pop(rid, None)
            if stream is not None:
                stream.accept(ValueError(message))
        for delta in msg.outputs:
            stream = requests.get(delta.request_id)
            if stream is None:
                continue  # aborted: outputs already on their way are dropped
            if delta.finished:
                del requests[delta.request_id]
            stream.put(delta)
        if msg.stats is not None:
            self.snapshot = EngineSnapshot.from_stats(msg.stats)  # one reference swap

    def _on_core_exit(self, how: str) -> None:
        """The core stopped (`how`: 'exited (exit code -9)', ...): fail what is in flight, then decide."""
        was_ready, self._is_ready = self._is_ready, False
        if self._closing:
            self._fail_all(EngineDeadError("the server is shutting down"))
            self._resolve_ready(EngineLoadError("the server shut down before the engine was ready"))
            return
        if not was_ready:
            err = EngineLoadError(self._failure or f"the engine {how} before it was ready")
            log.error("the engine could not be loaded: %s", err)
            self._fatal(err)
            return
        reason = f"the engine failed ({self._failure})" if self._failure else f"the engine {how}"
        if self._can_restart():
            delay = self._restart_delay()
            log.error("%s; restarting it in %.1f s", reason, delay)
            self._fail_all(EngineDeadError(f"{reason}; it is being restarted, retry the request"))
            self.num_restarts += 1
            self._restart_handle = self._loop.call_later(delay, self._start_core)
        else:
            log.error("%s", reason)
            self._fatal(EngineDeadError(reason))

    def _fatal(self, err: BaseException) -> None:
        self.dead = err
        self._fail_all(err if isinstance(err, EngineDeadError) else EngineDeadError(str(err)))
        self._resolve_ready(err)
        if self.on_fatal is not None:
            self.on_fatal(err)

    def _fail_all(self, err: EngineDeadError) -> None:
        for stream in self._requests.values():
            stream.fail(err)
        self._requests.clear()

    def _resolve_ready(self, error: BaseException) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: nobody may be waiting any more (shutdown while loading)

    def _run_on_loop(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the event loop now (from it) or soon (from another thread); skip if it closed."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn()
        else:
            try:
                loop.call_soon_threadsafe(fn)
            except RuntimeError:  # it closed meanwhile
                pass

    # ------------------------------------------------------------------ the transport
    def _start_core(self) -> None:
        raise NotImplementedError

    def _send(self, cmd: Any) -> None:
        raise NotImplementedError

    def _core_alive(self) -> bool:
        raise NotImplementedError

    def _can_restart(self) -> bool:
        return False

    def _restart_delay(self) -> float:
        return 0.0

    def close(self, timeout: float = 30.0) -> None:
        raise NotImplementedError


class InprocClient(EngineCoreClient):
    """The core loop on a thread of this process."""

    def __init__(self, source: Any):
        super().__init__(source)
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _start_core(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name="qiusuo-engine", daemon=True)
        self._thread.start()

    def _thread_main(self) -> None:
        how = "stopped"
        try:
            run_engine_core(self.source, self._cmds, self._post)
        except Exception as e:  # already logged and emitted by the core
            how = f"failed: {type(e).__name__}: {e}"
        finally:
            self._run_on_loop(lambda: self._on_core_exit(how))

    def _post(self, msg: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_message, msg)
        except RuntimeError:  # the loop is closed: the server is gone, stop the core
            self._cmds.put(Shutdown())

    def _send(self, cmd: Any) -> None:
        self._cmds.put(cmd)

    def _core_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop after its current step and wait for it. Any thread."""
        self._closing = True
        self._cmds.put(Shutdown())
        if self._thread is not None:
            self._thread.join(timeout)


class MPClient(EngineCoreClient):
    """The core loop in a spawned child process, respawned when it dies after serving."""

    def __init__(self, source: Callable[[], Any], restart: bool = True):
        check_loader(source)
        super().__init__(source)
        self.restart = restart
        self.process: multiprocessing.process.BaseProcess | None = None
        self._cmd: Connection | None = None
        self._out: Connection | None = None
        self._crashes_in_a_row = 0

    def _start_core(self) -> None:
        self._restart_handle = None
        if self._closing:
            return
        if self._cmd is not None:
            self._cmd.close()  # the dead child's
        ctx = multiprocessing.get_context("spawn")  # fork would copy the event loop, sockets and threads
        cmd_read, self._cmd = ctx.Pipe(duplex=False)
        self._out, out_write = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=engine_core_main, args=(self.source, cmd_read, out_write),
                                   name="qiusuo-engine-core", daemon=True)
        self.process.start()
        cmd_read.close()  # only the child holds these ends: its exit is our EOF, ours is its EOF
        out_write.close()
        self._loop.add_reader(self._out.fileno(), self._on_readable, self._out, self.process)
        # uvloop (libuv) makes a watched fd non-blocking; `recv_bytes` would then stop half-way through a
        # message larger than the pipe (64 KiB: one step of n=64 with top_logprobs=20) and raise. We read
        # only when a message has begun, and the child writes it whole: blocking for the rest is short.
        os.set_blocking(self._out.fileno(), True)

    def _send(self, cmd: Any) -> None:
        self._cmd.send_bytes(pickle.dumps(cmd, protocol=PROTOCOL))

    def _core_alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def _can_restart(self) -> bool:
        return self.restart

    def _restart_delay(self) -> float:
        if time.monotonic() - self._ready_since > RESTART_RESET_S:
            self._crashes_in_a_row = 0
        first, cap = RESTART_BACKOFF_S
        delay = min(cap, first * 2 ** self._crashes_in_a_row)
        self._crashes_in_a_row += 1
        return delay

    def _on_readable(self, out: Connection, process) -> None:
        try:
            msg = pickle.loads(out.recv_bytes())
        except (EOFError, OSError):
            self._on_eof(out, process)
            return
        self._on_message(msg)

    def _on_eof(self, out: Connection, process) -> None:
        """The child exited (or `close` closed our end): stop reading it, reap it, then decide."""
        if out.closed:
            return
        self._loop.remove_reader(out.fileno())
        out.close()
        process.join(5)
        if process.is_alive():  # its pipe broke but it runs: never leave it behind a new one
            log.error("the engine process's pipe closed while it runs; killing it")
            process.kill()
            process.join(5)
        self._on_core_exit(f"process exited (exit code {process.exitcode})")

    def close(self, timeout: float = 30.0) -> None:
        """Stop the child (EOF on its pipe; terminate after `timeout`) and reap it. Any thread."""
        self._closing = True
        handle = self._restart_handle
        if handle is not None:
            self._run_on_loop(handle.cancel)
        if self._cmd is not None:
            self._cmd.close()
        process, out = self.process, self._out
        if process is not None:
            process.join(timeout)
            if process.is_alive():
                log.warning("the engine process did not stop in %.0f s; terminating it", timeout)
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        if out is None:
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            out.close()
        else:
            self._run_on_loop(lambda: self._on_eof(out, process))
