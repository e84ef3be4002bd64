"""The inference process's step clock and per-session realignment, as pure logic (procs/inference/clock.py).

The last tests simulate the benchmark's clients without a server: random start phases, clocks ±300 ppm off
ours, sends jittered by ±5 ms, for 3 minutes, through the same scheduler the inference loop uses."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest

from procs.inference.clock import (
    BLOCK_NS,
    FRAME_NS,
    ClockRules,
    Realign,
    SessionTiming,
    StepClock,
    StepScheduler,
    circular,
)

MS = 1_000_000


def test_circular_maps_onto_the_80_ms_circle() -> None:
    assert circular(0) == 0
    assert circular(10 * MS) == 10 * MS
    assert circular(-10 * MS) == -10 * MS
    assert circular(75 * MS) == -5 * MS
    assert circular(-75 * MS) == 5 * MS
    assert circular(40 * MS) == 40 * MS and circular(-40 * MS) == 40 * MS


def test_the_first_session_starts_the_clock_mid_window_and_no_session_stops_it() -> None:
    sched = StepScheduler(2)
    assert sched.deadline_ns() is None and not sched.should_step(10**12)
    assert sched.open(0, first_frame_ns=1_000 * MS) == 0
    rules = sched.rules
    first_block = 1_000 * MS + 3 * FRAME_NS
    assert sched.deadline_ns() == first_block + rules.lead_ns + FRAME_NS // 2
    sched.close(0)
    assert sched.deadline_ns() is None


@pytest.mark.parametrize("offset_ms", range(0, 80, 3))
def test_a_new_session_is_placed_within_10_ms_of_the_window_centre(offset_ms: int) -> None:
    clock = StepClock()
    clock.start(block_complete_ns=5_000 * MS)
    first_frame = 7_000 * MS + offset_ms * MS
    k = clock.first_skip(first_frame)
    assert 0 <= k < 4
    assert abs(clock.phase_ns(first_frame + (3 + k) * FRAME_NS)) <= FRAME_NS // 2


def test_jitter_alone_never_realigns() -> None:
    rng = random.Random(1)
    clock = StepClock()
    clock.start(0)
    timing = SessionTiming()
    for _ in range(3 * 60 * 1000 // 80):  # 3 minutes of blocks near the edge of the window
        t = clock.window_centre_ns() + 9 * MS + rng.uniform(-5, 5) * MS
        assert timing.block_complete(int(t), clock) is Realign.NONE
        clock.advance(clock.tick_ns)
    assert timing.take_realignment() is Realign.NONE and timing.realigned == 0


@pytest.mark.parametrize("ppm", [300, -300])
def test_drift_is_pulled_back_one_frame_at_a_time_as_often_as_it_demands(ppm: int) -> None:
    clock = StepClock()
    clock.start(0)
    timing = SessionTiming()
    t = float(clock.window_centre_ns())
    minutes = 3
    for _ in range(minutes * 60 * 1000 // 80):
        realign = timing.block_complete(int(t), clock)
        clock.advance(clock.tick_ns)
        t += BLOCK_NS * (1 + ppm * 1e-6)
        applied = timing.take_realignment()
        assert applied is realign
        t += int(applied) * FRAME_NS
        assert abs(clock.phase_ns(int(t))) <= FRAME_NS / 2 + ClockRules().hysteresis_ns + 1 * MS
    drift_frames = minutes * 60 * abs(ppm) * 1e-6 * 1e9 / FRAME_NS  # 2.7 frames in 3 minutes
    assert int(drift_frames) <= timing.realigned <= int(drift_frames) + 1


def test_a_step_runs_early_once_every_due_session_is_ready() -> None:
    sched = StepScheduler(2)
    sched.open(0, 0)
    skip = sched.open(1, 5 * MS)
    tick = sched.deadline_ns()
    block_0 = 3 * FRAME_NS
    sched.block_complete(0, block_0)
    assert not sched.should_step(block_0)  # session 1 is due at this tick and not ready
    block_1 = 5 * MS + (3 + skip) * FRAME_NS
    sched.block_complete(1, block_1)
    assert block_1 < tick and sched.should_step(block_1)
    assert [(b.slot, b.ready_ns) for b in sched.take_step(block_1)] == [(0, block_0), (1, block_1)]
    assert sched.deadline_ns() == tick + BLOCK_NS


def test_a_session_that_misses_its_tick_is_not_waited_for_until_its_next_block() -> None:
    sched = StepScheduler(2)
    sched.open(0, 0)
    sched.open(1, 0)
    tick = sched.deadline_ns()
    sched.block_complete(0, 3 * FRAME_NS)
    assert not sched.should_step(tick - 1) and sched.should_step(tick)
    assert [b.slot for b in sched.take_step(tick)] == [0]
    sched.block_complete(0, 3 * FRAME_NS + BLOCK_NS)
    assert sched.should_step(3 * FRAME_NS + BLOCK_NS)  # slot 1 missed: not due until it completes a block


def test_a_block_that_comes_after_its_ticks_step_gets_a_catch_up_step_and_the_clock_stays() -> None:
    sched = StepScheduler(2)
    sched.open(0, 0)
    sched.open(1, 0)
    tick = sched.deadline_ns()
    sched.block_complete(0, 3 * FRAME_NS)
    sched.take_step(tick)  # slot 1 missed it
    late = tick + 2 * MS
    sched.block_complete(1, late)
    assert sched.should_step(late)
    assert [(b.slot, b.ready_ns) for b in sched.take_step(late)] == [(1, late)]
    assert sched.deadline_ns() == tick + BLOCK_NS and sched.catch_up_steps == 1
    assert not sched.should_step(late + 1)


def test_an_overrun_step_skips_the_ticks_it_ran_past() -> None:
    clock = StepClock()
    clock.start(0)
    first = clock.tick_ns
    clock.advance(first + 170 * MS)  # the step ended 170 ms after its tick
    assert clock.tick_ns == first + 240 * MS and clock.missed_ticks == 2


# ---- the benchmark's clients, simulated -------------------------------------------------------------------


@dataclass
class SimClient:
    slot: int
    start_ns: float
    rate: float  # 1 + ppm x 1e-6: its 20 ms is this many of ours
    frames_in_block: int = 0
    skip: int = 0
    ready: bool = False
    dropped_blocks: int = 0
    waits_ms: list[float] = field(default_factory=list)


@dataclass
class SimResult:
    steps: int
    seconds: float
    sessions_per_step: float
    mean_wait_ms: float
    realigned: list[int]
    dropped_blocks: int


def simulate(n: int, seconds: float, seed: int, ppm: float = 300.0, jitter_ms: float = 5.0) -> SimResult:
    rng = random.Random(seed)
    sched = StepScheduler(n)
    clients = [SimClient(i, rng.uniform(0, 80) * MS, 1 + rng.uniform(-ppm, ppm) * 1e-6) for i in range(n)]
    events: list[tuple[float, int, int]] = []  # (arrival time, slot, frame index)
    for c in clients:
        frames = int(seconds * 50)
        for j in range(frames):
            t = c.start_ns + j * FRAME_NS * c.rate + rng.uniform(-jitter_ms, jitter_ms) * MS
            events.append((t, c.slot, j))
    heapq.heapify(events)
    steps = 0
    stepped_sessions = 0

    def step(now: float) -> None:
        nonlocal steps, stepped_sessions
        blocks = sched.take_step(int(now))
        if blocks:
            steps += 1
            stepped_sessions += len(blocks)
            for block in blocks:
                clients[block.slot].waits_ms.append((now - block.ready_ns) / MS)
                clients[block.slot].ready = False

    while events:
        t, slot, j = heapq.heappop(events)
        while sched.deadline_ns() is not None and sched.deadline_ns() <= t:
            step(sched.deadline_ns())
        c = clients[slot]
        if j == 0:
            c.skip = sched.open(slot, int(t))
        if c.skip:
            c.skip -= 1
            continue
        c.frames_in_block += 1 - int(sched.timing[slot].take_realignment())  # REPEAT counts twice, DROP none
        if c.frames_in_block >= 4:
            c.frames_in_block -= 4
            if c.ready:
                c.dropped_blocks += 1
            c.ready = True
            sched.block_complete(slot, int(t))
        if sched.should_step(int(t)):
            step(t)
    waits = [w for c in clients for w in c.waits_ms]
    return SimResult(
        steps=steps,
        seconds=seconds,
        sessions_per_step=stepped_sessions / steps,
        mean_wait_ms=sum(waits) / len(waits),
        realigned=[sched.timing[c.slot].realigned for c in clients],
        dropped_blocks=sum(c.dropped_blocks for c in clients),
    )


@pytest.mark.parametrize("n", [4, 8, 16, 32])
def test_simulated_drifting_jittering_clients_share_one_step_per_80_ms(n: int) -> None:
    result = simulate(n, seconds=180, seed=n)
    assert result.steps / result.seconds <= 12.75
    assert result.sessions_per_step >= 0.97 * n
    drift_demand = 180 * 300e-6 / 0.02  # at most 2.7 frames in 3 minutes at the largest drift
    assert max(result.realigned) <= int(drift_demand) + 1, result.realigned
    assert result.dropped_blocks == 0
    print(f"N={n}: {result.steps / result.seconds:.2f} steps/s, {result.sessions_per_step:.2f} sessions per "
          f"step, mean wait {result.mean_wait_ms:.1f} ms, realigned {sum(result.realigned)}")
