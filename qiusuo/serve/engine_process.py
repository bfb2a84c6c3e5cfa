"""`ProcessEngine`: the `LLMEngine` stepping in its own engine-core process (vLLM V1's split).

Why: with the engine on a thread of the API process (`AsyncEngine`), the engine thread and the
asyncio loop share one GIL. At 32 streaming clients the engine's CPU per token rose from 0.08 ms
(offline) to 0.11 ms and served throughput stalled at 68-70 % of offline (bench/serve.py, issue 6).
Here the engine owns a whole interpreter; the API process keeps HTTP, SSE, JSON and metrics.

The child is started with `spawn` and builds its engine by calling a picklable zero-argument
loader: models never cross the pipe. It then runs the thread version's loop (commands between
steps; block when idle, drain when busy) and sends ONE message per engine step: the acks and
refusals of the commands it applied, each request's output as a delta (new text, token ids and
logprobs; the API process rebuilds the cumulative `RequestOutput`, so a message stays O(batch),
not O(batch x tokens so far)), and the engine stats when they changed. Pickle protocol 5.

Pipes: parent -> child commands, child -> parent messages, one-way each. In the child a reader
thread moves commands into a queue as they arrive, so a burst of large prompts can never block
the API process's event loop on a full pipe while the child blocks on its own full pipe. The
API process reads with `loop.add_reader` (no thread). EOF either way ends the other side: the
child exits when the parent closes its pipe or dies (no orphans); the parent marks the engine
dead and fails every request in flight with `EngineDeadError` when the child exits.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import pickle
import queue
import signal
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable

from qiusuo.engine import CompletionOutput, RequestOutput, SamplingParams
from qiusuo.engine.reasoning import with_thinking_budget

from .async_engine import EngineDeadError, EngineSnapshot, RequestStream, _ACK, take_commands

log = logging.getLogger("qiusuo.serve")

PROTOCOL = 5


class EngineLoadError(RuntimeError):
    """The engine process could not build its engine (or exited before it was ready)."""


def check_loader(loader: Any) -> None:
    """Raise ValueError unless `loader` is a zero-argument callable that pickles (it crosses to the
    engine process by reference: a module-level function or a `functools.partial` of one)."""
    if not callable(loader) or hasattr(loader, "llm_engine") or hasattr(loader, "step"):
        raise ValueError("engine_process=True needs a picklable zero-argument loader (a module-level function "
                         f"or functools.partial) that builds the engine, got {type(loader).__name__}; pass "
                         "engine_process=False to serve a live engine on a thread")
    try:
        pickle.dumps(loader, protocol=PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise ValueError(f"engine_process=True: the loader {loader!r} does not pickle ({e}); use a module-level "
                         "function or functools.partial of one, not a lambda or a nested function") from None


# ---------------------------------------------------------------------- the engine-core process
def _send(conn: Connection, msg: tuple) -> None:
    conn.send_bytes(pickle.dumps(msg, protocol=PROTOCOL))


def _compact(out: RequestOutput) -> tuple:
    """What is new in `out`: per sample the deltas plus the small cumulative fields."""
    samples = []
    for o in out.outputs:
        new_lps = None
        if o.logprobs is not None:  # one logprob table per token: the new tokens' are the tail
            new_lps = o.logprobs[len(o.token_ids) - len(o.delta_token_ids):]
        samples.append((o.index, o.delta_text, o.delta_token_ids, o.finish_reason, o.stop_reason,
                        o.cumulative_logprob, new_lps))
    return out.request_id, out.finished, out.num_cached_tokens, samples


def _read_commands(conn: Connection, cmds: queue.SimpleQueue) -> None:
    try:
        while True:
            cmds.put(pickle.loads(conn.recv_bytes()))
    except (EOFError, OSError):  # the API process closed the pipe or died
        cmds.put(("close",))


def engine_core_main(loader: Callable[[], Any], cmd_conn: Connection, out_conn: Connection) -> None:
    """The child's entry point: build the engine, report ready, serve commands until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the API process decides
    try:
        engine = loader()
        engine = getattr(engine, "llm_engine", engine)  # an offline `LLM` wraps one
        info = {"tokenizer": engine.tokenizer, "max_model_len": engine.max_model_len,
                "vocab_size": engine.model.config.vocab_size, "stats": engine.stats()}
        ready = pickle.dumps(("ready", info), protocol=PROTOCOL)
    except Exception as e:  # reported by /health, as a failed load on the thread is
        log.exception("the engine process could not load its engine")
        _send(out_conn, ("load_error", f"{type(e).__name__}: {e}"))
        return
    out_conn.send_bytes(ready)
    cmds: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_commands, args=(cmd_conn, cmds), name="qiusuo-commands", daemon=True).start()
    try:
        # This process owns the engine: enter its inference context (eval mode, inference mode, its
        # threads) once, not on every step; a model left in train mode costs a train/eval switch per
        # step otherwise (0.19 ms a step, +25 % CPU per token at batch 1 on tiny-dense).
        with engine.inference_context():
            _EngineCore(engine, cmds, out_conn).run()
    except (BrokenPipeError, ConnectionResetError):  # the API process went away: nothing to report to
        return
    except Exception as e:  # an engine bug: say so, then exit; the API process fails what is in flight
        log.exception("the engine process failed")
        try:
            _send(out_conn, ("dead", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
        raise SystemExit(1) from None


class _EngineCore:
    """AsyncEngine._run's loop, with one message per step instead of event-loop callbacks."""

    def __init__(self, engine, cmds: queue.SimpleQueue, out_conn: Connection):
        self.engine, self.cmds, self.out = engine, cmds, out_conn
        self.acks: list[str] = []
        self.errors: list[tuple[str, str]] = []
        self.last_stats: dict[str, Any] | None = None

    def run(self) -> None:
        engine = self.engine
        while True:
            for cmd in take_commands(self.cmds, block=not engine.has_unfinished_requests()):
                if cmd[0] == "close":
                    return
                self._apply(cmd)
            outputs = engine.step() if engine.has_unfinished_requests() else []
            stats = engine.stats()
            changed = stats != self.last_stats
            if outputs or self.acks or self.errors or changed:
                _send(self.out, ("step", self.acks, self.errors, [_compact(o) for o in outputs],
                                 stats if changed else None))
                self.acks, self.errors, self.last_stats = [], [], stats

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "add":
            _, rid, prompt_ids, params = cmd
            try:
                self.engine.add_request(rid, prompt_ids, params, add_special_tokens=False)
            except ValueError as e:
                self.errors.append((rid, str(e)))
                return
            self.acks.append(rid)
        elif cmd[0] == "abort":
            self.engine.abort_request(cmd[1])


# ---------------------------------------------------------------------- the API process's end
@dataclass
class _Sample:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)


@dataclass
class _Request:
    stream: RequestStream
    prompt_ids: list[int]
    samples: dict[int, _Sample] = field(default_factory=dict)

    def rebuild(self, item: tuple) -> RequestOutput:
        """The cumulative `RequestOutput` the engine would have returned, from its delta."""
        rid, finished, num_cached, samples = item
        outs = []
        for index, delta_text, delta_ids, finish_reason, stop_reason, cum_lp, new_lps in samples:
            s = self.samples.get(index)
            if s is None:
                s = self.samples[index] = _Sample()
            s.text += delta_text
            s.token_ids.extend(delta_ids)
            if new_lps is not None:
                s.logprobs.extend(new_lps)
            # copies: a consumer may still hold an earlier output while the next one is rebuilt
            outs.append(CompletionOutput(index, s.text, s.token_ids[:], cum_lp,
                                         s.logprobs[:] if new_lps is not None else None, finish_reason,
                                         stop_reason, delta_text, delta_ids))
        return RequestOutput(rid, None, self.prompt_ids, outs, finished, num_cached)


class ProcessEngine:
    """Drop-in for `AsyncEngine` (submit, abort, start, close, dead, snapshot, is_alive) whose engine
    steps in a spawned process. `await ready()` after `start`: it raises `EngineLoadError` when the
    loader failed. `tokenizer`, `max_model_len` and `vocab_size` are known once ready."""

    def __init__(self, loader: Callable[[], Any]):
        check_loader(loader)
        self.loader = loader
        self.tokenizer = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.dead: BaseException | None = None
        self.snapshot = EngineSnapshot()
        self.process: multiprocessing.process.BaseProcess | None = None
        self._requests: dict[str, _Request] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None
        self._cmd: Connection | None = None
        self._out: Connection | None = None
        self._closing = False
        self._is_ready = False

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        ctx = multiprocessing.get_context("spawn")  # fork would copy the event loop, sockets and threads
        cmd_read, self._cmd = ctx.Pipe(duplex=False)
        self._out, out_write = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=engine_core_main, args=(self.loader, cmd_read, out_write),
                                   name="qiusuo-engine-core", daemon=True)
        self.process.start()
        cmd_read.close()  # only the child holds these ends: its exit is our EOF, ours is its EOF
        out_write.close()
        self._loop = loop
        self._ready = loop.create_future()
        loop.add_reader(self._out.fileno(), self._on_readable)

    async def ready(self) -> None:
        await asyncio.shield(self._ready)

    def is_alive(self) -> bool:
        return self.dead is None and self.process is not None and self.process.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the child (EOF on its pipe; terminate after `timeout`) and reap it. Any thread."""
        self._closing = True
        if self._cmd is not None:
            self._cmd.close()
        if self.process is not None:
            self.process.join(timeout)
            if self.process.is_alive():
                log.warning("the engine process did not stop in %.0f s; terminating it", timeout)
                self.process.terminate()
                self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                self._on_exit()
            else:
                try:
                    loop.call_soon_threadsafe(self._on_exit)
                except RuntimeError:  # the loop closed meanwhile
                    self._out.close()
        elif self._out is not None:
            self._out.close()

    # ------------------------------------------------------------------ requests (event loop)
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               thinking_budget: int | None = None, opened_by_prompt: bool = False) -> RequestStream:
        if self.dead is not None:
            raise EngineDeadError(f"the engine process stopped: {self.dead!r}")
        if self._closing or not self._is_ready:
            raise EngineDeadError("the engine process is not running")
        stream = RequestStream(request_id)
        params = with_thinking_budget(params, thinking_budget, self.tokenizer, opened_by_prompt)
        self._requests[request_id] = _Request(stream, prompt_ids)
        try:
            _send(self._cmd, ("add", request_id, prompt_ids, params))
        except OSError as e:  # the child is gone and we have not read its EOF yet
            self._fail_all(EngineDeadError(f"the engine process is gone: {e!r}"))
        return stream

    def abort(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is None or self._closing or self.dead is not None:
            return  # finished (the engine forgot it too), refused, or nothing left to abort
        try:
            _send(self._cmd, ("abort", request_id))
        except OSError:
            pass  # the child is gone; its EOF fails everything else

    # ------------------------------------------------------------------ messages (event loop)
    def _on_readable(self) -> None:
        try:
            msg = pickle.loads(self._out.recv_bytes())
        except (EOFError, OSError):
            self._on_exit()
            return
        kind = msg[0]
        if kind == "step":
            self._on_step(*msg[1:])
        elif kind == "ready":
            self._on_ready(msg[1])
        elif kind == "load_error":
            self._resolve_ready(EngineLoadError(msg[1]))
        elif kind == "dead":
            self.dead = EngineDeadError(f"the engine failed: {msg[1]}")

    def _on_ready(self, info: dict[str, Any]) -> None:
        self.tokenizer = info["tokenizer"]
        self.max_model_len, self.vocab_size = info["max_model_len"], info["vocab_size"]
        self.snapshot = EngineSnapshot.from_stats(info["stats"])
        self._is_ready = True
        self._resolve_ready(None)

    def _on_step(self, acks: list[str], errors: list[tuple[str, str]], outputs: list[tuple],
                 stats: dict[str, Any] | None) -> None:
        requests = self._requests
        for rid in acks:
            r = requests.get(rid)
            if r is not None:  # else aborted before the child saw the add
                r.stream.queue.put_nowait(_ACK)
        for rid, message in errors:
            r = requests.pop(rid, None)
            if r is not None:
                r.stream.queue.put_nowait(ValueError(message))
        for item in outputs:
            r = requests.get(item[0])
            if r is None:
                continue  # aborted: outputs already in the pipe are dropped
            if item[1]:
                del requests[item[0]]
            r.stream.queue.put_nowait(r.rebuild(item))
        if stats is not None:
            self.snapshot = EngineSnapshot.from_stats(stats)  # one reference swap, as the thread version

    def _on_exit(self) -> None:
        """EOF from the child (it exited), or `close`: stop reading and fail what is in flight."""
        if self._out is None or self._out.closed:
            return
        self._loop.remove_reader(self._out.fileno())
        self._out.close()
        code = self.process.exitcode if self.process is not None else None
        if self._closing:
            err = EngineDeadError("the server is shutting down")
        else:
            if self.process is not None:
                self.process.join(5)
                code = self.process.exitcode
            log.error("the engine process exited (exit code %s)", code)
            err = self.dead or EngineDeadError(f"the engine process exited (exit code {code})")
            self.dead = err
        self._resolve_ready(EngineLoadError(f"the engine process exited (exit code {code}) before it was ready"))
        self._fail_all(err)

    def _fail_all(self, err: EngineDeadError) -> None:
        if not self._closing and self.dead is None:
            self.dead = err
        for r in self._requests.values():
            r.stream.queue.put_nowait(err)
        self._requests.clear()

    def _resolve_ready(self, error: BaseException | None) -> None:
        if self._ready is None or self._ready.done():
            return
        if error is None:
            self._ready.set_result(None)
        else:
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: nobody may be waiting any more (shutdown while loading)
