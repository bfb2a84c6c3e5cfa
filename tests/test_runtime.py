"""Thread choice by measurement (qiusuo.runtime.ThreadTuner), driven by a fake clock and fake step
times: the first steps try each count, the faster per unit of work is kept, near-ties keep fewer
threads, and later re-checks follow a neighbour that starts or stops."""

from __future__ import annotations

import pytest

import qiusuo.runtime as runtime
from qiusuo.runtime import ThreadTuner, thread_candidates


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def drive(tuner: ThreadTuner, clock: Clock, per_token: dict[int, float], steps: int, tokens: int = 1000) -> list[int]:
    """Run `steps` fake steps whose time is tokens * per_token[threads]; returns the counts used."""
    used = []
    for _ in range(steps):
        n = tuner.next_threads()
        seconds = tokens * per_token[n]
        clock.t += seconds
        tuner.observe(n, seconds, tokens)
        used.append(n)
    return used


@pytest.fixture(autouse=True)
def _no_shared_measurement(monkeypatch):
    monkeypatch.setattr(runtime, "_measured", None)


def test_candidates_are_powers_of_two_and_the_core_count():
    assert thread_candidates(1) == (1,)
    assert thread_candidates(2) == (1, 2)
    assert thread_candidates(6) == (1, 2, 4, 6)
    assert thread_candidates(8) == (1, 2, 4, 8)


def test_first_steps_try_each_count_and_keep_the_faster():
    clock = Clock()
    tuner = ThreadTuner((1, 2), start=1, warmup=1, trials=2, clock=clock)
    used = drive(tuner, clock, {1: 1e-4, 2: 0.6e-4}, steps=8)
    assert used[:5] == [1, 1, 2, 1, 2]  # warm-up at the start count, then interleaved trials
    assert used[5:] == [2, 2, 2] and tuner.current == 2
    first = tuner.decisions[0]
    assert first["seconds_per_unit"] == {1: pytest.approx(1e-4), 2: pytest.approx(0.6e-4)} and first["changed"]
    assert runtime.default_threads() == 2  # later stages of this process start from the measurement


def test_a_busy_neighbour_makes_one_thread_win_even_if_the_load_average_said_two():
    clock = Clock()
    tuner = ThreadTuner((1, 2), start=2, clock=clock)
    drive(tuner, clock, {1: 1e-4, 2: 5e-4}, steps=10)  # OpenMP stalls: 2 threads 5x slower
    assert tuner.current == 1


def test_a_near_tie_keeps_fewer_threads():
    clock = Clock()
    tuner = ThreadTuner((1, 2), start=2, margin=0.9, clock=clock)
    drive(tuner, clock, {1: 1e-4, 2: 0.95e-4}, steps=10)
    assert tuner.current == 1


def test_the_warmup_step_is_not_measured():
    clock = Clock()
    tuner = ThreadTuner((1, 2), start=1, warmup=1, trials=1, clock=clock)
    n = tuner.next_threads()
    tuner.observe(n, 100.0, 1000)  # a slow first step (allocations) must not count against 1 thread
    drive(tuner, clock, {1: 1e-4, 2: 1.5e-4}, steps=4)
    assert tuner.current == 1 and tuner.decisions[0]["seconds_per_unit"][1] == pytest.approx(1e-4)


def test_rechecks_follow_a_neighbour_that_stops_and_back_off_when_nothing_changed():
    clock = Clock()
    tuner = ThreadTuner((1, 2), start=1, recheck_s=10.0, clock=clock)
    busy, quiet = {1: 1e-3, 2: 5e-3}, {1: 1e-3, 2: 0.55e-3}
    drive(tuner, clock, busy, steps=6)
    assert tuner.current == 1
    drive(tuner, clock, busy, steps=15)  # a re-check at ~10 s confirms 1 thread: the interval doubles
    assert tuner.current == 1 and len(tuner.decisions) >= 2 and not tuner.decisions[1]["changed"]
    checks = len(tuner.decisions)
    used = drive(tuner, clock, quiet, steps=40)  # the neighbour stopped
    assert tuner.current == 2 and used[-1] == 2 and len(tuner.decisions) > checks
    assert tuner.summary()["switches"] >= 1


def test_one_candidate_is_never_probed():
    clock = Clock()
    tuner = ThreadTuner((1,), start=1, clock=clock)
    assert drive(tuner, clock, {1: 1e-4}, steps=5) == [1] * 5 and tuner.decisions == []
    assert tuner.summary()["first_measurement"] is None


def test_steps_at_an_unplanned_count_do_not_confuse_the_schedule():
    clock = Clock()
    tuner = ThreadTuner((1, 2), start=1, warmup=0, trials=1, clock=clock)
    tuner.observe(2, 1.0, 1000)  # e.g. the loop ran a step before asking: ignored, not a trial
    drive(tuner, clock, {1: 1e-4, 2: 2e-4}, steps=4)
    assert tuner.current == 1


@pytest.mark.parametrize("kwargs", [dict(candidates=(0, 1)), dict(trials=0), dict(margin=0.0), dict(recheck_s=0)])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        ThreadTuner(**kwargs)


def test_a_fresh_measurement_skips_the_first_round_and_is_rechecked_later():
    clock = Clock()
    tuner = ThreadTuner((1, 2), start=2, measure_first=False, recheck_s=10.0, clock=clock)
    used = drive(tuner, clock, {1: 1e-3, 2: 0.5e-3}, steps=5)  # 0.5 s per step: no probe before 10 s
    assert used == [2] * 5 and tuner.decisions == []
    used = drive(tuner, clock, {1: 1e-3, 2: 0.5e-3}, steps=30)
    assert used.count(1) == 1 and tuner.current == 2  # one probe step at 1 thread, confirmed 2
    summary = tuner.summary()
    assert summary["measured_first"] is False and summary["rechecks"] == 1 and summary["switches"] == 0
