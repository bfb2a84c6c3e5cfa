"""math-verify grading in a pool of worker processes with a hard per-item timeout.

math-verify's own timeouts use `signal.alarm`, which only works on the main thread (TRL's
`accuracy_reward` turns them off in worker threads for that reason), and some inputs make SymPy
run for minutes or forever (`9^{9^{9}}` builds a 370-million-digit integer; measured: killed by us after 30 s). So the
caller never parses model text itself: each (gold, answer) pair goes to a worker process which
calls math-verify with its timeouts disabled, and the dispatcher kills any worker that has not
answered within `timeout_s`, scores that item 0, counts it in `num_timeouts`, and starts a fresh
worker. A worker that crashes (stack overflow on deep nesting, out of memory under its
RLIMIT_AS) scores its item 0 and is replaced the same way. Answers longer than `max_chars` are
scored 0 without parsing: no honest final answer is that long, and it keeps megabyte strings off
the pipe.

Workers are started with the "spawn" method: forking a parent that runs torch's thread pools
can deadlock, and spawn costs ~0.6 s per worker once (the math-verify import).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

_READY = "ready"


def _parse_any(parse, text: str) -> list:
    """math-verify finds `$…$` and `\\boxed{}`; bare LaTeX such as `\\sqrt{2}` needs a `$` pair."""
    parsed = parse(text, parsing_timeout=None)
    if not parsed and "$" not in text:
        parsed = parse(f"${text}$", parsing_timeout=None)
    return parsed


def _worker_main(conn: Connection, memory_bytes: int) -> None:
    """Worker loop: receive (gold, answer), send 1.0/0.0; None ends the loop."""
    import resource

    if memory_bytes > 0:  # a runaway SymPy computation raises MemoryError instead of swapping
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    # math-verify warns on every call that we disabled its timeout; we enforce our own.
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    from math_verify import parse, verify

    conn.send(_READY)
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        gold, answer = item
        try:
            gold_parsed, answer_parsed = _parse_any(parse, gold), _parse_any(parse, answer)
            ok = bool(gold_parsed and answer_parsed and verify(gold_parsed, answer_parsed, timeout_seconds=None))
        except Exception:  # MemoryError, RecursionError, SymPy errors: all score 0
            ok = False
        conn.send(1.0 if ok else 0.0)


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection


class MathVerifyPool:
    """Grade answers with math-verify in `num_workers` processes, `timeout_s` per item."""

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, max_chars: int = 2000,
                 memory_mb: int = 2048, startup_timeout_s: float = 120.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}; it is the hard per-item limit")
        self.num_workers, self.timeout_s, self.max_chars = num_workers, timeout_s, max_chars
        self.memory_bytes = memory_mb * 2**20
        self.startup_timeout_s = startup_timeout_s
        self.num_timeouts = 0  # items killed at the deadline
        self.num_crashes = 0  # workers that died on an item
        self.num_rejected = 0  # answers over max_chars, scored 0 unparsed
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()  # one batch at a time: workers are not shared between batches

    # --- worker lifecycle ---
    def _start_workers(self) -> None:
        fresh = []
        while len(self._workers) + len(fresh) < self.num_workers:
            parent, child = self._ctx.Pipe()
            proc = self._ctx.Process(target=_worker_main, args=(child, self.memory_bytes), daemon=True)
            proc.start()
            child.close()
            fresh.append(_Worker(proc, parent))
        for w in fresh:  # the import happens before READY, so it never eats an item's timeout
            if not w.conn.poll(self.startup_timeout_s) or w.conn.recv() != _READY:
                w.process.kill()
                raise RuntimeError(f"math-verify worker did not start within {self.startup_timeout_s} s")
            self._workers.append(w)

    def _discard(self, w: _Worker) -> None:
        w.process.kill()
        w.process.join()
        w.conn.close()
        self._workers.remove(w)

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        for w in list(self._workers):
            try:
                w.conn.send(None)
            except OSError:
                pass  # already dead: kill below is enough
            w.process.join(timeout=1.0)
            self._discard(w)

    def __enter__(self) -> MathVerifyPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- grading ---
    def verify(self, gold: str, answer: str | None) -> tuple[float, bool]:
        """(score, timed_out) for one pair."""
        return self.verify_many([(gold, answer)])[0]

    def verify_many(self, pairs: list[tuple[str, str | None]]) -> list[tuple[float, bool]]:
        """(score, timed_out) for each (gold, answer) pair, in order; never raises on model text."""
        with self._lock:
            return self._verify_many(pairs)

    def _verify_many(self, pairs: list[tuple[str, str | None]]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        todo: deque[int] = deque()
        for i, (gold, answer) in enumerate(pairs):
            if answer is None or not answer.strip():
                continue
            if len(answer) > self.max_chars:
                self.num_rejected += 1
                continue
            todo.append(i)
        busy: dict[int, tuple[_Worker, int, float]] = {}  # id(worker) -> (worker, item, deadline)
        while todo or busy:
            if todo:
                self._start_workers()
            for w in self._workers:
                if not todo:
                    break
                if id(w) not in busy:
                    i = todo.popleft()
                    w.conn.send(pairs[i])
                    busy[id(w)] = (w, i, time.monotonic() + self.timeout_s)
            next_deadline = min(deadline for _, _, deadline in busy.values())
            ready = wait([w.conn for w, _, _ in busy.values()], timeout=max(0.0, next_deadline - time.monotonic()))
            for key, (w, i, deadline) in list(busy.items()):
                if w.conn in ready:
                    del busy[key]
                    try:
                        results[i] = (float(w.conn.recv()), False)
                    except (EOFError, OSError):  # the worker died on this item
                        self.num_crashes += 1
                        self._discard(w)
                elif time.monotonic() >= deadline:
                    del busy[key]
                    self.num_timeouts += 1
                    results[i] = (0.0, True)
                    self._discard(w)
        return results


def math_verify_reward(pool: MathVerifyPool, answer_column: str = "answer"):
    """A TRL-signature reward `f(completions, **columns)` grading `<answer>` blocks with `pool`."""
    from qiusuo.rewards.format import completion_text, extract_answer

    def reward(completions, **columns) -> list[float]:
        golds = columns.get(answer_column)
        if golds is None or len(golds) != len(completions):
            raise ValueError(f"pass one gold answer per completion as {answer_column}=[...]")
        pairs = [(str(g), extract_answer(completion_text(c))) for c, g in zip(completions, golds)]
        return [score for score, _ in pool.verify_many(pairs)]

    reward.__name__ = "math_verify_reward"
    return reward
