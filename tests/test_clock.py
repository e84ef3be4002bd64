"""The inference process's step clock and per-session realignment, as pure logic (procs/inference/clock.py).

The last tests simulate clients without a server: random start phases, clocks ±300 ppm off ours, sends
delayed by 0-10 ms, frames sent one by one or in bursts, for minutes, through the same scheduler the
inference loop uses, frame by frame."""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from procs.inference.clock import (
    BLOCK_NS,
    FRAME_NS,
    ArrivalLine,
    ClockRules,
    Feed,
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


def feed_block(sched: StepScheduler, slot: int, first_seq: int, t_ns: Callable[[int], int]) -> None:
    """Frames first_seq .. first_seq + 3 arrive at t_ns(seq), fed once each; the last completes a block."""
    for seq in range(first_seq, first_seq + 4):
        assert sched.frame(slot, seq, t_ns(seq)) is Feed.ONCE
    sched.block_complete(slot, first_seq + 3, t_ns(first_seq + 3), None)


def test_the_first_session_starts_the_clock_at_its_first_block_and_no_session_stops_it() -> None:
    sched: StepScheduler[None] = StepScheduler(2)
    assert sched.deadline_ns() is None and not sched.should_step(10**12)
    sched.open(0)
    assert sched.deadline_ns() is None  # placing: not timed before its first block
    feed_block(sched, 0, 0, lambda seq: 1_000 * MS + seq * FRAME_NS)
    rules = sched.rules
    assert sched.deadline_ns() == 1_000 * MS + 3 * FRAME_NS + rules.lead_ns + FRAME_NS // 2
    timing = sched.timing(0)
    assert timing is not None and timing.skip == 0  # its blocks sit mid-window already
    sched.close(0)
    assert sched.deadline_ns() is None


def test_the_arrival_line_is_the_earliest_arrival_over_its_window() -> None:
    line = ArrivalLine(window=8)
    for seq, late_ms in enumerate([0, 60, 40, 20, 0, 60, 40, 20, 0]):  # bursts of four frames
        line.add(seq, seq * FRAME_NS + late_ms * MS + 5 * MS)
        assert line.at(seq) == seq * FRAME_NS + 5 * MS
    for seq in range(9, 30):  # every frame 3 ms later than before, for good (a route change)
        line.add(seq, seq * FRAME_NS + 8 * MS)
    assert line.at(30) == 30 * FRAME_NS + 8 * MS  # the window forgot the earlier line


@pytest.mark.parametrize("offset_ms", range(0, 80, 3))
def test_a_new_session_is_placed_within_10_ms_of_the_window_centre(offset_ms: int) -> None:
    clock = StepClock()
    clock.start(block_complete_ns=5_000 * MS)
    block = 7_000 * MS + offset_ms * MS
    k = clock.placement_skip(block)
    assert 0 <= k < 4
    assert abs(clock.phase_ns(block + k * FRAME_NS)) <= FRAME_NS // 2


def test_a_session_is_placed_by_its_line_not_by_when_a_burst_landed() -> None:
    # Session 1 sends pages of 60 ms: its frames 0-2 arrive together with frame 2, 3-5 with frame 5...
    sched: StepScheduler[None] = StepScheduler(2)
    sched.open(0)
    feed_block(sched, 0, 0, lambda seq: seq * FRAME_NS)
    sched.open(1)
    start = 1_000 * MS + 7 * MS

    def page_arrival(seq: int) -> int:
        return start + (seq // 3 * 3 + 2) * FRAME_NS

    fed = [sched.frame(1, seq, page_arrival(seq)) for seq in range(4)]
    assert fed == [Feed.ONCE] * 4
    sched.block_complete(1, 3, page_arrival(3), None)
    timing = sched.timing(1)
    assert timing is not None and timing.phase_ns is not None
    # Frame 3 came 40 ms after its line (with frame 5): the session is placed by the line, within ±10 ms.
    assert abs(timing.phase_ns) <= FRAME_NS // 2, timing.phase_ns


def test_jitter_alone_never_realigns() -> None:
    rng = random.Random(1)
    sched: StepScheduler[None] = StepScheduler(1)
    sched.open(0)
    arrival = [rng.uniform(0, 10) * MS for _ in range(3 * 60 * 50)]  # 3 minutes of frames, 0-10 ms late
    for block in range(len(arrival) // 4):
        feed_block(sched, 0, 4 * block, lambda seq: int(seq * FRAME_NS + arrival[seq]))
        while sched.should_step(4 * block * FRAME_NS + 100 * MS):
            sched.take_step(4 * block * FRAME_NS + 100 * MS)
    timing = sched.timing(0)
    assert timing is not None and timing.realigned == 0 and timing.pending is Feed.ONCE


@pytest.mark.parametrize("ppm", [300, -300])
def test_drift_is_pulled_back_one_frame_at_a_time_as_often_as_it_demands(ppm: int) -> None:
    clock = StepClock()
    clock.start(0)
    timing = SessionTiming()
    minutes = 3
    seq = fed = 0
    while seq < minutes * 60 * 50:
        t = int(seq * FRAME_NS * (1 + ppm * 1e-6))
        feed = timing.frame(seq, t)
        fed += feed.times
        if fed >= 4:  # a block completed with this frame
            fed -= 4
            timing.block_complete(seq, t, clock)
            if timing.placed and timing.blocks > 1:
                assert timing.phase_ns is not None
                assert abs(timing.phase_ns) <= FRAME_NS / 2 + ClockRules().hysteresis_ns + 1 * MS
            while clock.tick_ns is not None and clock.tick_ns <= t:
                clock.advance(clock.tick_ns)
        seq += 1
    drift_frames = minutes * 60 * abs(ppm) * 1e-6 * 1e9 / FRAME_NS  # 2.7 frames in 3 minutes
    assert int(drift_frames) <= timing.realigned <= int(drift_frames) + 1


def test_a_step_runs_early_once_every_awaited_session_has_a_block() -> None:
    sched: StepScheduler[None] = StepScheduler(2)
    sched.open(0)
    sched.open(1)
    feed_block(sched, 0, 0, lambda seq: seq * FRAME_NS)
    feed_block(sched, 1, 0, lambda seq: seq * FRAME_NS + 5 * MS)
    tick = sched.deadline_ns()
    assert tick is not None and sched.should_step(3 * FRAME_NS + 5 * MS)  # both placed, both queued
    assert [b.slot for b in sched.take_step(3 * FRAME_NS + 5 * MS)] == [0, 1]
    assert sched.deadline_ns() == tick + BLOCK_NS
    feed_block(sched, 0, 4, lambda seq: seq * FRAME_NS)
    assert not sched.should_step(7 * FRAME_NS)  # session 1's block is expected by this tick, and not in


def test_a_session_that_misses_its_tick_is_not_waited_for_until_its_next_block() -> None:
    sched: StepScheduler[None] = StepScheduler(2)
    sched.open(0)
    sched.open(1)
    feed_block(sched, 0, 0, lambda seq: seq * FRAME_NS)
    feed_block(sched, 1, 0, lambda seq: seq * FRAME_NS)
    sched.take_step(3 * FRAME_NS)
    tick = sched.deadline_ns()
    assert tick is not None
    feed_block(sched, 0, 4, lambda seq: seq * FRAME_NS)
    assert not sched.should_step(tick - 1) and sched.should_step(tick)
    assert [b.slot for b in sched.take_step(tick)] == [0]
    feed_block(sched, 0, 8, lambda seq: seq * FRAME_NS)
    assert sched.should_step(11 * FRAME_NS)  # slot 1 missed: not awaited until it completes a block


def test_a_late_block_waits_for_the_next_tick_and_a_slot_behind_for_good_is_caught_up() -> None:
    sched: StepScheduler[str] = StepScheduler(1)
    sched.open(0)
    blocks = 0

    def block(late_ms: float) -> None:
        nonlocal blocks
        first = 4 * blocks
        for seq in range(first, first + 4):
            sched.frame(0, seq, seq * FRAME_NS)
        sched.block_complete(0, first + 3, (first + 3) * FRAME_NS + int(late_ms * MS), f"b{blocks}")
        blocks += 1

    def tick() -> list[str]:
        now = sched.deadline_ns()
        assert now is not None
        return [b.payload for b in sched.take_step(now)]

    block(0)
    assert tick() == ["b0"]
    tick_1 = sched.deadline_ns()
    assert tick_1 is not None
    assert tick() == []  # b1 is late: a spike of jitter beyond the lead
    block(30)
    # No catch-up step for one late block: it waits for the next tick, whose own block is awaited as usual.
    assert not sched.should_step(tick_1 + 10 * MS)
    taken = []
    for _ in range(sched.rules.backlog_ticks):
        block(0)  # on time from now on, but one tick behind: it holds two blocks at every tick
        assert sched.queued(0) == 2
        taken += tick()
    assert taken == [f"b{i}" for i in range(1, 1 + sched.rules.backlog_ticks)]
    assert sched.catch_up_steps == 0
    now = sched.deadline_ns() - 1
    assert sched.queued(0) == 1 and sched.should_step(now)  # behind for good: caught up before the tick
    assert [b.payload for b in sched.take_step(now)] == [f"b{1 + sched.rules.backlog_ticks}"]
    assert sched.catch_up_steps == 1 and sched.queued(0) == 0


def test_a_slot_that_outgrows_its_queue_loses_its_oldest_block() -> None:
    sched: StepScheduler[int] = StepScheduler(1)
    sched.open(0)
    dropped = 0
    for b in range(sched.rules.max_queued_blocks + 2):
        for seq in range(4 * b, 4 * b + 4):
            sched.frame(0, seq, seq * FRAME_NS)
        dropped += sched.block_complete(0, 4 * b + 3, (4 * b + 3) * FRAME_NS, b)
    assert dropped == 2 and sched.queued(0) == sched.rules.max_queued_blocks
    assert [b.payload for b in sched.take_step(0)] == [2]


def test_ticks_an_overrun_step_ran_past_are_owed_up_to_a_bound_and_skipped_beyond() -> None:
    clock = StepClock()
    clock.start(0)
    first = clock.tick_ns
    assert first is not None
    clock.advance(first + 100 * MS)  # the step for `first` began 100 ms late: the next tick is owed
    assert clock.tick_ns == first + BLOCK_NS and clock.missed_ticks == 0
    clock.advance(first + 400 * MS)  # far behind: only the last `owed_ticks` are still stepped
    assert clock.tick_ns is not None and clock.missed_ticks > 0
    assert first + 400 * MS - clock.tick_ns < clock.rules.owed_ticks * BLOCK_NS
    assert clock.tick_ns + BLOCK_NS * clock.rules.owed_ticks > first + 400 * MS


# ---- clients, simulated frame by frame ------------------------------------------------------------------


@dataclass
class SimClient:
    slot: int
    start_ns: float
    rate: float  # 1 + ppm x 1e-6: its 20 ms is this many of ours
    burst: int = 1  # frames per send
    fed: int = 0
    dropped_blocks: int = 0
    waits_ms: list[float] = field(default_factory=list)
    waited_two_ticks: int = 0  # blocks stepped later than the tick after the one next when they completed


@dataclass
class SimResult:
    steps: int
    catch_up_steps: int
    seconds: float
    sessions_per_step: float
    waits_ms: dict[int, list[float]]  # per burst size, after the first 2 s
    realigned: list[int]
    dropped_blocks: int
    waited_two_ticks: int


def simulate(n: int, seconds: float, seed: int, ppm: float = 300.0, jitter_ms: float = 5.0,
             bursts: tuple[int, ...] = (1,)) -> SimResult:
    """`n` clients at random phases, clocks up to ±ppm off ours, each sending its frames in bursts of one of
    `bursts` frames (a burst leaves when its last frame is captured), each send delayed 0-2 x jitter_ms (in
    order, as over TCP), fed through the scheduler the way the inference loop feeds it."""
    rng = random.Random(seed)
    # Each block carries the tick that was next when it completed: it must be stepped by the tick after it.
    sched: StepScheduler[int | None] = StepScheduler(n)
    clients = [SimClient(i, rng.uniform(0, 80) * MS, 1 + rng.uniform(-ppm, ppm) * 1e-6,
                         bursts[i % len(bursts)]) for i in range(n)]
    events: list[tuple[float, int, int]] = []  # (arrival time, slot, frame index)
    for c in clients:
        frames = int(seconds * 50)
        last = 0.0
        for j in range(frames):
            sent_with = (j // c.burst + 1) * c.burst - 1  # the burst leaves with its last frame
            t = c.start_ns + sent_with * FRAME_NS * c.rate + rng.uniform(0, 2 * jitter_ms) * MS
            last = max(last, t)
            events.append((last, c.slot, j))
    heapq.heapify(events)
    steps = stepped_sessions = 0

    def step(now: float) -> None:
        nonlocal steps, stepped_sessions
        blocks = sched.take_step(int(now))
        if blocks:
            steps += 1
            stepped_sessions += len(blocks)
            for block in blocks:
                if now >= 2e9:  # once every session is placed and settled
                    clients[block.slot].waits_ms.append((now - block.ready_ns) / MS)
                    if block.payload is not None and now > block.payload + BLOCK_NS:
                        clients[block.slot].waited_two_ticks += 1

    while events:
        t, slot, j = heapq.heappop(events)
        while (deadline := sched.deadline_ns()) is not None and deadline <= t:
            step(deadline)
        c = clients[slot]
        if j == 0:
            sched.open(slot)
        c.fed += sched.frame(slot, j, int(t)).times
        if c.fed >= 4:
            c.fed -= 4
            c.dropped_blocks += sched.block_complete(slot, j, int(t), sched.deadline_ns())
        while sched.should_step(int(t)):
            step(t)
    waits: dict[int, list[float]] = {}
    for c in clients:
        waits.setdefault(c.burst, []).extend(c.waits_ms)
    timings = [sched.timing(c.slot) for c in clients]
    return SimResult(
        steps=steps,
        catch_up_steps=sched.catch_up_steps,
        seconds=seconds,
        sessions_per_step=stepped_sessions / steps,
        waits_ms=waits,
        realigned=[t.realigned if t is not None else -1 for t in timings],
        dropped_blocks=sum(c.dropped_blocks for c in clients),
        waited_two_ticks=sum(c.waited_two_ticks for c in clients),
    )


@pytest.mark.parametrize("n", [4, 8, 16, 32])
def test_simulated_drifting_jittering_clients_share_one_step_per_80_ms(n: int) -> None:
    result = simulate(n, seconds=180, seed=n)
    assert result.steps / result.seconds <= 12.75
    assert result.sessions_per_step >= 0.97 * n
    drift_demand = 180 * 300e-6 / 0.02  # at most 2.7 frames in 3 minutes at the largest drift
    assert max(result.realigned) <= int(drift_demand) + 1, result.realigned
    assert result.dropped_blocks == 0 and result.waited_two_ticks == 0
    print(f"N={n}: {result.steps / result.seconds:.2f} steps/s, {result.sessions_per_step:.2f} sessions per "
          f"step, mean wait {np.mean(result.waits_ms[1]):.1f} ms, realigned {sum(result.realigned)}")


@pytest.mark.parametrize("burst", [1, 2, 3, 4, 8])
def test_bursty_senders_with_exact_clocks_lose_nothing_and_are_not_realigned(burst: int) -> None:
    # Frames in bursts of 1, 2, 4, 8 (and Ogg pages of 20-80 ms: 1-4 frames), exact clocks, no jitter,
    # beside smooth sessions: nothing dropped, no realignment in a minute, one step per tick.
    result = simulate(8, seconds=60, seed=burst, ppm=0, jitter_ms=0, bursts=(1, burst))
    assert result.dropped_blocks == 0
    assert max(result.realigned) == 0, result.realigned
    # At most one catch-up step per session, for a first block that came before the session was placed.
    assert result.catch_up_steps <= 8
    assert result.steps <= 12.5 * result.seconds + 1 + result.catch_up_steps
    # A bursty session waits for its step at most one block more than a smooth one: a smooth block is
    # stepped at the tick after it completes, a bursty one at that tick or the next.
    smooth, bursty = result.waits_ms[1], result.waits_ms[burst]
    print(f"burst {burst}: wait mean {np.mean(bursty):.1f} ms, worst {max(bursty):.1f} ms (smooth: mean "
          f"{np.mean(smooth):.1f} ms, worst {max(smooth):.1f} ms)")
    assert result.waited_two_ticks == 0
    assert max(smooth) <= BLOCK_NS / MS and max(bursty) <= 2 * BLOCK_NS / MS


@pytest.mark.parametrize("burst", [1, 2, 4, 8])
def test_bursty_drifting_jittering_senders_lose_nothing(burst: int) -> None:
    result = simulate(16, seconds=120, seed=100 + burst, bursts=(1, burst))
    drift_demand = 120 * 300e-6 / 0.02
    assert result.dropped_blocks == 0
    assert max(result.realigned) <= int(drift_demand) + 1, result.realigned
    assert result.steps / result.seconds <= 12.75
