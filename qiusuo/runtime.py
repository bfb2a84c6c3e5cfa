"""Process-level runtime facts and choices every command shares: how many torch threads to use (below),
glibc's allocator (`pin_mmap_threshold` for training, `malloc_trim`), and the CPU's feature flags (`cpu_flags`).

On a shared 2-core machine, 2 torch threads ran 1.7x faster than 1 when the machine was quiet
but 4-10x *slower* under a busy neighbour (OpenMP barrier stalls: 0.55 s/step with 1 thread vs
5.2 s/step with 2 at load 3.8). The load average cannot tell the two cases apart: it is a
1-minute mean, so right after another command it still reads ~1.7 on an idle machine, and a
demo started then ran at half speed on 1 thread. So a training run measures instead
(`ThreadTuner`): its first steps alternate between the candidate counts, the fastest per token
is kept, and the other counts are re-tried now and then (a neighbour may start or stop). The
load average only picks the count of the very first step (`default_threads`).

Changing the count between steps does not change what is computed on the CPU builds measured
here: 4 pretraining steps at 1 and at 2 threads gave bitwise-identical weights (tiny-dense).
"""

from __future__ import annotations

import ctypes
import functools
import os
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

# The most recent measured choice in this process (threads, when): later stages of the same
# process (the demo's GRPO after its pretraining) start from it instead of the load average.
_measured: tuple[int, float] | None = None
MEASURED_FRESH_S = 300.0


def fresh_measurement() -> int | None:
    """The thread count a ThreadTuner of this process chose in the last MEASURED_FRESH_S seconds."""
    if _measured is not None and time.monotonic() - _measured[1] < MEASURED_FRESH_S:
        return _measured[0]
    return None


def default_threads() -> int:
    """A measured choice of this process if recent; else all cores on a quiet machine, and on 2
    cores 1 thread once the load average says a neighbour is busy."""
    measured = fresh_measurement()
    if measured is not None:
        return measured
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        load = 0.0
    if cores <= 2:
        return 1 if load >= 1.5 else cores
    return max(1, cores - int(load))  # leave the cores a neighbour is using


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None or 0: `default_threads()`); returns the number used."""
    import torch

    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


def thread_candidates(cores: int | None = None) -> tuple[int, ...]:
    """The counts worth timing: 1, 2, 4, ... up to the core count, and the core count itself."""
    cores = max(1, cores or os.cpu_count() or 1)
    out, n = [], 1
    while n < cores:
        out.append(n)
        n *= 2
    return tuple(out + [cores])


class ThreadTuner:
    """Chooses torch's thread count for a loop of comparable steps by timing them.

    The loop asks `next_threads()` before each step and reports `observe(threads, seconds, work)`
    after it (`work`: tokens or another size the step's time is proportional to). Schedule:
    `warmup` steps at `start` (allocations and lazy initialisation are not representative), then
    `trials` rounds through every candidate (interleaved, so a neighbour's load hits each alike),
    then the fastest median seconds per unit of work is kept. A higher count is kept only when
    it beats a lower one by `margin` (a near-tie keeps the count a neighbour hurts least). Every
    `recheck_s` seconds the other candidates get `recheck_trials` steps each and are compared with
    the recent steps at the kept count; a re-check that confirms the choice doubles the interval
    (a probe at the wrong count costs up to ~20x a step under a busy neighbour, so they are rare).
    `measure_first=False` (a count this process measured moments ago) skips the first round.
    """

    def __init__(self, candidates: tuple[int, ...] | None = None, start: int | None = None, *, warmup: int = 1,
                 trials: int = 2, recheck_s: float = 120.0, recheck_trials: int = 1, margin: float = 0.9,
                 measure_first: bool = True, clock: Callable[[], float] = time.monotonic):
        self.candidates = tuple(sorted(set(candidates or thread_candidates())))
        if not self.candidates or self.candidates[0] < 1:
            raise ValueError(f"thread candidates must be >= 1, got {candidates}")
        if trials < 1 or recheck_trials < 1 or warmup < 0 or recheck_s <= 0 or not 0 < margin <= 1:
            raise ValueError("ThreadTuner needs trials, recheck_trials >= 1, warmup >= 0, recheck_s > 0 and "
                             "0 < margin <= 1")
        start = start if start in self.candidates else self.candidates[0]
        self.measure_first = measure_first
        self.current, self.trials, self.recheck_trials = start, trials, recheck_trials
        self.margin, self.clock = margin, clock
        self.recheck_s, self._interval = recheck_s, recheck_s
        self._plan: deque[int] = deque()
        self._warmup_left = 0
        self._probe: dict[int, list[float]] = {}  # threads -> seconds per unit of work, this round
        self._recent: deque[float] = deque(maxlen=8)  # seconds per unit at `current`, between rounds
        self._next_check: float | None = None
        self.decisions: list[dict[str, Any]] = []  # one per measurement round
        if len(self.candidates) == 1:  # nothing to choose between: never measured, never re-checked
            return
        if measure_first:
            self._plan.extend([start] * warmup + self._round(include_current=True, trials=trials))
            self._warmup_left = warmup
        else:
            self._next_check = clock() + recheck_s

    def _round(self, include_current: bool, trials: int) -> list[int]:
        counts = [c for c in self.candidates if include_current or c != self.current]
        return [c for _ in range(trials) for c in counts]

    def next_threads(self) -> int:
        if not self._plan and self._next_check is not None and self.clock() >= self._next_check:
            self._plan.extend(self._round(include_current=False, trials=self.recheck_trials))  # re-check
            self._next_check = None
        return self._plan[0] if self._plan else self.current

    def observe(self, threads: int, seconds: float, work: float = 1.0) -> None:
        per = seconds / max(work, 1e-9)
        planned = bool(self._plan) and self._plan[0] == threads
        if planned:
            self._plan.popleft()
        if self._warmup_left > 0 and planned:
            self._warmup_left -= 1
            return
        if planned:
            self._probe.setdefault(threads, []).append(per)
            if not self._plan:
                self._decide()
        elif threads == self.current:
            self._recent.append(per)

    def _decide(self) -> None:
        measured = {c: statistics.median(v) for c, v in self._probe.items()}
        if self.current not in measured and self._recent:
            measured[self.current] = statistics.median(self._recent)
        counts = sorted(measured)
        best = counts[0]
        for c in counts[1:]:  # fewest threads first; more only when clearly faster
            if measured[c] < self.margin * measured[best]:
                best = c
        changed = best != self.current
        self.decisions.append({"threads": best, "seconds_per_unit": {c: round(v, 9) for c, v in sorted(measured.items())},
                               "changed": changed, "at": round(self.clock(), 3)})
        if changed:
            self._recent.clear()
        self._interval = self.recheck_s if changed or len(self.decisions) == 1 else 2 * self._interval
        self.current = best
        self._probe = {}
        self._next_check = self.clock() + self._interval
        global _measured
        _measured = (best, time.monotonic())

    def summary(self) -> dict[str, Any]:
        """The kept count, whether it was measured at the start (or taken from this process's last
        measurement), the first measurement, and how many re-checks there were and changed it."""
        first = self.decisions[0] if self.decisions else None
        rechecks = self.decisions[1:] if self.measure_first else self.decisions
        return {"threads": self.current, "candidates": list(self.candidates), "measured_first": self.measure_first,
                "first_measurement": first and first["seconds_per_unit"], "rechecks": len(rechecks),
                "switches": sum(d["changed"] for d in rechecks)}


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim (hand freed heap memory back to the OS), or None where there is none (macOS, musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def pin_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of `nbytes` or more with its own mmap, returned to the OS when freed.

    glibc raises its mmap threshold each time a large mmapped block is freed (its "dynamic" threshold,
    up to 32 MiB; see mallopt(3)), so after the first training step a step's activations and gradients
    come from the heap instead, and their mix of sizes fragments it: a LoRA forward + backward of two
    Qwen2.5-0.5B-shaped layers (16 x 262 tokens, checkpointing on) grew peak RSS by 605 MB with the
    dynamic threshold and 97 MB with it pinned at 1 MiB; GRPO at that shape (24 layers, 256-token
    completions) peaked at 8.5 GiB, 4.2 GiB pinned, for ~10 % more CPU time (bench/grpo_real.py).
    Called by every trainer. Does nothing (returns False) off glibc, or when the environment sets
    MALLOC_MMAP_THRESHOLD_ (the user's own choice wins)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (or no mallopt): nothing to pin
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, int(nbytes)) == 1


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (x86 `flags`, ARM `Features`): what
    kernels a CPU has is read, never assumed. Empty where there is no such file (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(flag for line in text.splitlines() if line.startswith(("flags", "Features"))
                     for flag in line.split(":", 1)[1].split())
