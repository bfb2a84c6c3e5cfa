"""The engine core: the one loop that owns an `LLMEngine`, and the messages to and from it.

The engine is not thread-safe and its `step()` blocks for a whole forward pass, so one thread
owns it (vLLM V1's `EngineCore`). `run_engine_core` builds the engine (calling the loader when
given one), reports `Ready` or `LoadFailed`, then loops: apply the commands waiting between
steps (block while idle, drain while busy), step, and emit ONE `StepOutput` per step with the
acks and refusals of the commands it applied, each request's output as a delta (new text, token
ids and logprobs; the client rebuilds the cumulative output, see outputs.RequestStream) and the
engine stats when they changed. The whole run is inside the engine's inference context (eval
mode, inference mode, its threads): entered once, not switched on every step.

A request with structured outputs has its grammar compiled on a worker thread first (xgrammar
releases the GIL; a big JSON schema can take seconds), so the loop keeps stepping the others
meanwhile: the request waits, unacknowledged, and is added when `GrammarCompiled` comes back
through the same command queue (the engine's compile is then a cache hit, see
engine/guided.py). An abort while it compiles drops it; the compiled grammar stays cached.

The loop does not know its transport. `core_client.InprocClient` runs it on a thread of the API
process and emits with `loop.call_soon_threadsafe`; `core_client.MPClient` runs it in a child
process (`engine_core_main` below) and emits over a pipe, pickled. Every message is a small
dataclass; the only things that cross are token ids, text, sampling params and stats.
"""

from __future__ import annotations

import logging
import pickle
import queue
import signal
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable

from qiusuo.engine import LLMEngine, RequestOutput, SamplingParams

log = logging.getLogger("qiusuo.serve")

PROTOCOL = 5  # pickle protocol of the pipe


# ---------------------------------------------------------------------- client -> core
@dataclass
class AddRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    lora_name: str | None = None  # the LoRA adapter it runs with (None: the base)


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class GrammarCompiled:
    """From the core's own grammar worker: `request_id`'s grammar is compiled (or failed: `error`)."""

    request_id: str
    error: BaseException | None = None


@dataclass
class Shutdown:
    """Stop the loop (the server is closing, or the API process's pipe reached EOF)."""


# ---------------------------------------------------------------------- core -> client
@dataclass
class SampleDelta:
    """What is new in one sample since the previous step, plus its small cumulative fields."""

    index: int
    delta_text: str
    delta_token_ids: list[int]
    finish_reason: str | None
    stop_reason: int | str | None
    cumulative_logprob: float | None
    new_logprobs: list | None  # one {token id: Logprob} table per new token; None without logprobs


@dataclass
class RequestDelta:
    request_id: str
    finished: bool
    num_cached_tokens: int
    samples: list[SampleDelta]

    @classmethod
    def of(cls, out: RequestOutput) -> "RequestDelta":
        samples = []
        for o in out.outputs:
            new_lps = None
            if o.logprobs is not None:  # one table per token: the new tokens' are the tail
                new_lps = o.logprobs[len(o.token_ids) - len(o.delta_token_ids):]
            samples.append(SampleDelta(o.index, o.delta_text, list(o.delta_token_ids), o.finish_reason,
                                       o.stop_reason, o.cumulative_logprob, new_lps))
        return cls(out.request_id, out.finished, out.num_cached_tokens, samples)


@dataclass
class StepOutput:
    acks: list[str] = field(default_factory=list)  # requests the engine took
    errors: list[tuple[str, str]] = field(default_factory=list)  # (request id, why the engine refused it)
    outputs: list[RequestDelta] = field(default_factory=list)
    stats: dict[str, Any] | None = None  # LLMEngine.stats() when it changed


@dataclass
class Ready:
    tokenizer: Any
    max_model_len: int
    vocab_size: int
    stats: dict[str, Any]
    lora_names: list[str] = field(default_factory=list)  # the LoRA adapters it serves on the base


@dataclass
class LoadFailed:
    message: str  # "ExceptionType: message"


@dataclass
class EngineFailed:
    message: str  # an engine bug: the loop raised; the core stops


# ---------------------------------------------------------------------- the loop
def take_commands(cmds: queue.SimpleQueue, block: bool) -> list:
    """The commands waiting in `cmds`; when `block` (the engine is idle) wait for at least one."""
    out = [cmds.get()] if block else []
    while True:
        try:
            out.append(cmds.get_nowait())
        except queue.Empty:
            return out


def is_engine(source: Any) -> bool:
    """An engine (or an offline `LLM`, which wraps one) rather than a loader that builds one."""
    return isinstance(source, LLMEngine) or hasattr(source, "llm_engine") or hasattr(source, "step")


class EngineCore:
    def __init__(self, engine: LLMEngine, cmds: queue.SimpleQueue, emit: Callable[[Any], None]):
        self.engine, self.cmds, self.emit = engine, cmds, emit
        self.acks: list[str] = []
        self.errors: list[tuple[str, str]] = []
        self.last_stats: dict[str, Any] | None = None
        self.compiling: dict[str, AddRequest] = {}  # requests whose grammar the worker is compiling
        # One worker: compiles run one at a time (GrammarBackend serialises them anyway), in arrival order.
        self._grammar_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qiusuo-grammar")

    def run(self) -> None:
        engine = self.engine
        try:
            with engine.inference_context():
                while True:
                    for cmd in take_commands(self.cmds, block=not engine.has_unfinished_requests()):
                        if isinstance(cmd, Shutdown):
                            return
                        self._apply(cmd)
                    outputs = engine.step() if engine.has_unfinished_requests() else []
                    stats = engine.stats()
                    changed = stats != self.last_stats
                    if outputs or self.acks or self.errors or changed:
                        self.emit(StepOutput(self.acks, self.errors, [RequestDelta.of(o) for o in outputs],
                                             stats if changed else None))
                        self.acks, self.errors, self.last_stats = [], [], stats
        finally:
            self._grammar_worker.shutdown(wait=False, cancel_futures=True)

    def _apply(self, cmd: AddRequest | AbortRequest | GrammarCompiled) -> None:
        if isinstance(cmd, AddRequest):
            if cmd.params.structured_outputs is not None:
                self._compile(cmd)
            else:
                self._add(cmd)
        elif isinstance(cmd, GrammarCompiled):
            add = self.compiling.pop(cmd.request_id, None)
            if add is None:
                return  # aborted while it compiled
            if cmd.error is None:
                self._add(add)
            elif isinstance(cmd.error, ValueError):  # an invalid grammar: the request's 400
                self.errors.append((cmd.request_id, str(cmd.error)))
            else:
                raise cmd.error  # a bug: the loop fails as if add_request had raised it
        elif isinstance(cmd, AbortRequest):
            if self.compiling.pop(cmd.request_id, None) is None:
                self.engine.abort_request(cmd.request_id)

    def _add(self, cmd: AddRequest) -> None:
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt_ids, cmd.params, add_special_tokens=False,
                                    lora_request=cmd.lora_name)
        except ValueError as e:
            self.errors.append((cmd.request_id, str(e)))
            return
        self.acks.append(cmd.request_id)

    def _compile(self, cmd: AddRequest) -> None:
        """Compile `cmd`'s grammar on the worker; `GrammarCompiled` comes back through the command queue."""
        if cmd.request_id in self.compiling:  # the engine would refuse the duplicate id: so do we, now
            self.errors.append((cmd.request_id, f"request_id {cmd.request_id!r} is already in use; pick a unique id"))
            return
        self.compiling[cmd.request_id] = cmd
        # The engine's own compile, so the grammar lands in the cache its add_request reads.
        compile_grammar = self.engine.compile_grammar

        def done(f: Future) -> None:
            error = None if f.cancelled() else f.exception()
            self.cmds.put(GrammarCompiled(cmd.request_id, error))

        self._grammar_worker.submit(compile_grammar, cmd.params).add_done_callback(done)


def run_engine_core(source: Any, cmds: queue.SimpleQueue, emit: Callable[[Any], None]) -> None:
    """Build the engine from `source` (an engine, an `LLM`, or a zero-argument loader), emit `Ready`
    or `LoadFailed`, then run the loop until `Shutdown`. An exception of the loop is emitted as
    `EngineFailed` and re-raised; one of `emit` itself (the other side is gone) propagates."""
    try:
        engine = source if is_engine(source) else source()
        engine = getattr(engine, "llm_engine", engine)  # an offline `LLM` wraps one
        ready = Ready(engine.tokenizer, engine.max_model_len, engine.model.config.vocab_size, engine.stats(),
                      engine.list_loras())
    except Exception as e:  # the client reports it (/health, and `qiusuo serve` exits with it)
        log.debug("the engine could not be loaded", exc_info=True)
        emit(LoadFailed(f"{type(e).__name__}: {e}"))
        return
    emit(ready)
    try:
        EngineCore(engine, cmds, emit).run()
    except (BrokenPipeError, ConnectionResetError):  # the API process went away: nothing to report to
        raise
    except Exception as e:  # an engine bug: fail what is in flight rather than hang it
        log.exception("the engine core failed")
        emit(EngineFailed(f"{type(e).__name__}: {e}"))
        raise


# ---------------------------------------------------------------------- the engine-core process
def check_loader(loader: Any) -> None:
    """Raise ValueError unless `loader` is a zero-argument callable that pickles (it crosses to the
    engine process by reference: a module-level function or a `functools.partial` of one)."""
    if not callable(loader) or is_engine(loader):
        raise ValueError("engine_process=True needs a picklable zero-argument loader (a module-level function "
                         f"or functools.partial) that builds the engine, got {type(loader).__name__}; pass "
                         "engine_process=False to serve a live engine on a thread")
    try:
        pickle.dumps(loader, protocol=PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as e:
        raise ValueError(f"engine_process=True: the loader {loader!r} does not pickle ({e}); use a module-level "
                         "function or functools.partial of one, not a lambda or a nested function") from None


def _read_commands(conn: Connection, cmds: queue.SimpleQueue) -> None:
    """A thread: pipe -> queue as commands arrive, so the API process never blocks on a full pipe
    while this process blocks on its own. EOF (the API process closed the pipe or died) stops it."""
    try:
        while True:
            cmds.put(pickle.loads(conn.recv_bytes()))
    except (EOFError, OSError):
        cmds.put(Shutdown())


def engine_core_main(loader: Callable[[], Any], cmd_conn: Connection, out_conn: Connection) -> None:
    """The child's entry point (spawned): build the engine, serve commands until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the API process decides

    def emit(msg: Any) -> None:
        out_conn.send_bytes(pickle.dumps(msg, protocol=PROTOCOL))

    cmds: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_commands, args=(cmd_conn, cmds), name="qiusuo-commands", daemon=True).start()
    try:
        run_engine_core(loader, cmds, emit)
    except (BrokenPipeError, ConnectionResetError):
        return
    except Exception:  # already reported as EngineFailed; the client restarts us
        raise SystemExit(1) from None
