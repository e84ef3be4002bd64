"""When the inference process steps, and how each session's 80 ms blocks are kept in time with the steps.

Pure logic, no clock reads: every method takes the time it is asked about (`time.monotonic_ns()` values).

The step clock
--------------
A batched step costs the same whatever the number of live slots (a masked slot costs as much as a live
one), and one step per 80 ms is all the audio needs, so the inference process steps on **one clock**: a tick
every 80 ms of its own monotonic time while any session is open, none otherwise. The step for a tick takes
every slot whose block is ready. It runs at the tick at the latest, and earlier as soon as every session
that is due at this tick has its block ready (so a ready block waits as little as possible); either way the
next tick is 80 ms after this one, so there is exactly one step per tick. A block that still comes after
its tick's step (a stall, a burst of jitter) gets a catch-up step of its own at once rather than waiting a
whole period or being dropped; the realignment below makes that rare.

Keeping sessions in time
------------------------
Frames arrive at each client's own phase, its clock drifts (300 ppm is a 20 ms frame a minute) and the
network jitters, so a session's block boundary wanders against the ticks. Each session's blocks are kept
in a window before the tick,

    [tick - lead - 20 ms, tick - lead]          (within ±10 ms of its centre, tick - lead - 10 ms)

`lead` leaves room for jitter, so a block that is due does not miss its tick. A new session is placed in
the window by skipping 0-3 of its first frames. Afterwards its phase (where its blocks complete, relative to
the window's centre, on the 80 ms circle) is smoothed over blocks, so jitter averages out and only drift
moves it; when it leaves the window by more than `hysteresis`, one input frame is repeated (the block
completes 20 ms earlier) or dropped (20 ms later), and that realignment is counted. Drift alone therefore
costs one realignment per 20 ms it accumulates: about one a minute at 300 ppm.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

FRAME_NS = 20_000_000
BLOCK_NS = 80_000_000
FRAMES_PER_BLOCK = 4


@dataclass(frozen=True)
class ClockRules:
    # A block completes at least this long before its tick: room for ±5 ms of send jitter plus the
    # hysteresis. It costs no wait while every session comes (the step runs as soon as all are in), only
    # when one does not: then the others wait for it until the tick.
    lead_ns: int = 10_000_000
    hysteresis_ns: int = 3_000_000  # how far past the window's edge the smoothed phase may go
    smoothing: float = 0.1  # weight of the newest block in the smoothed phase
    settle_blocks: int = 12  # no realignment before the phase is averaged over this many blocks (~1 s)


class Realign(enum.IntEnum):
    """What to do with a session's next input frame."""

    NONE = 0
    REPEAT = -1  # feed a frame twice: the blocks complete 20 ms earlier
    DROP = 1  # skip a frame: the blocks complete 20 ms later


def circular(delta_ns: float, period_ns: int = BLOCK_NS) -> float:
    """`delta_ns` on a circle of `period_ns`, in (-period/2, period/2]."""
    half = period_ns / 2
    return -((-delta_ns + half) % period_ns - half)


class StepClock:
    """The tick: `tick_ns` while sessions are open, None otherwise."""

    def __init__(self, rules: ClockRules | None = None) -> None:
        self.rules = rules or ClockRules()
        self.tick_ns: int | None = None
        self.missed_ticks = 0  # ticks skipped because a step overran past the next one

    @property
    def running(self) -> bool:
        return self.tick_ns is not None

    def start(self, block_complete_ns: int) -> None:
        """The first session's first block completes at `block_complete_ns`: tick so it sits mid-window."""
        self.tick_ns = block_complete_ns + self.rules.lead_ns + FRAME_NS // 2

    def stop(self) -> None:
        self.tick_ns = None

    def window_centre_ns(self) -> int:
        assert self.tick_ns is not None
        return self.tick_ns - self.rules.lead_ns - FRAME_NS // 2

    def phase_ns(self, block_complete_ns: int) -> float:
        """Where a block completed, relative to the window's centre, on the 80 ms circle."""
        return circular(block_complete_ns - self.window_centre_ns())

    def advance(self, now_ns: int) -> None:
        """The step for this tick ran (or there was nothing to step): the next tick is 80 ms later, or the
        first one still ahead if the step overran."""
        assert self.tick_ns is not None
        self.tick_ns += BLOCK_NS
        if self.tick_ns <= now_ns:
            behind = (now_ns - self.tick_ns) // BLOCK_NS + 1
            self.tick_ns += behind * BLOCK_NS
            self.missed_ticks += behind

    def first_skip(self, first_frame_ns: int) -> int:
        """Frames (0-3) a new session skips so its first block completes nearest the window's centre."""
        assert self.tick_ns is not None
        first_block = first_frame_ns + (FRAMES_PER_BLOCK - 1) * FRAME_NS
        return min(range(FRAMES_PER_BLOCK), key=lambda k: abs(self.phase_ns(first_block + k * FRAME_NS)))


class SessionTiming:
    """One session's blocks against the clock: its smoothed phase, whether it is due at a tick, and when it
    must be realigned."""

    def __init__(self, rules: ClockRules | None = None) -> None:
        self.rules = rules or ClockRules()
        self.phase_ns: float | None = None  # smoothed; None until the first block
        self.blocks = 0
        self.expected_ns: int | None = None  # when its next block should complete
        self.realigned = 0
        self.pending = Realign.NONE

    def expect_first_block(self, first_frame_ns: int, skip: int) -> None:
        self.expected_ns = first_frame_ns + (skip + FRAMES_PER_BLOCK - 1) * FRAME_NS

    def due(self, tick_ns: int) -> bool:
        """Is a block of this session expected for this tick (so the step may wait for it until the tick)?
        A block expected up to half a period after the tick is a late one of this tick, not the next's."""
        return self.expected_ns is not None and self.expected_ns <= tick_ns + BLOCK_NS // 2

    def missed(self) -> None:
        """Its block did not come by the tick: wait for it no more until it comes."""
        self.expected_ns = None

    def block_complete(self, t_ns: int, clock: StepClock) -> Realign:
        """A block of this session completed at `t_ns`; returns the realignment to apply to its next frame."""
        rules = self.rules
        phase = clock.phase_ns(t_ns)
        self.blocks += 1
        if self.phase_ns is None:
            self.phase_ns = phase
        else:  # smoothed on the circle (a running mean over the first blocks, so one jittered block
            # does not decide): the newest block's difference from the estimate, weighted
            weight = max(rules.smoothing, 1.0 / self.blocks)
            self.phase_ns += weight * circular(phase - self.phase_ns)
        self.expected_ns = t_ns + BLOCK_NS
        limit = FRAME_NS / 2 + rules.hysteresis_ns
        if self.blocks < rules.settle_blocks:
            return Realign.NONE
        if self.phase_ns > limit:
            self.pending = Realign.REPEAT
        elif self.phase_ns < -limit:
            self.pending = Realign.DROP
        else:
            return Realign.NONE
        self.phase_ns += int(self.pending) * FRAME_NS  # where its blocks will complete once it is applied
        return self.pending

    def take_realignment(self) -> Realign:
        """The realignment to apply to the next input frame (once), counted."""
        pending, self.pending = self.pending, Realign.NONE
        if pending is not Realign.NONE:
            self.realigned += 1
            if self.expected_ns is not None:
                self.expected_ns += int(pending) * FRAME_NS
        return pending


@dataclass(frozen=True, slots=True)
class ReadyBlock:
    slot: int
    ready_ns: int


class StepScheduler:
    """The step clock and every open session's timing: when to step, which blocks a step takes.

    The inference loop tells it what happened (a session opened or closed, a block completed) and asks it
    when the next step is due (`deadline_ns`) and whether to step now (`should_step`); `take_step` then
    says which blocks the step takes and moves the clock on."""

    def __init__(self, n_slots: int, rules: ClockRules | None = None) -> None:
        self.rules = rules or ClockRules()
        self.clock = StepClock(self.rules)
        self.timing: list[SessionTiming | None] = [None] * n_slots
        self.ready_ns: list[int | None] = [None] * n_slots
        self.late: set[int] = set()  # slots whose ready block missed its tick's step
        self.catch_up_steps = 0

    def open(self, slot: int, first_frame_ns: int) -> int:
        """A session starts in `slot` with a frame that arrived at `first_frame_ns`; returns how many of its
        first frames to skip so that its blocks sit in the window before the ticks."""
        timing = self.timing[slot] = SessionTiming(self.rules)
        self.ready_ns[slot] = None
        self.late.discard(slot)
        if not self.clock.running:
            self.clock.start(first_frame_ns + (FRAMES_PER_BLOCK - 1) * FRAME_NS)
        skip = self.clock.first_skip(first_frame_ns)
        timing.expect_first_block(first_frame_ns, skip)
        return skip

    def close(self, slot: int) -> None:
        self.timing[slot] = None
        self.ready_ns[slot] = None
        self.late.discard(slot)
        if all(t is None for t in self.timing):
            self.clock.stop()

    def block_complete(self, slot: int, t_ns: int) -> Realign:
        """A block of `slot` is ready for a step; returns the realignment for its next frame."""
        timing = self.timing[slot]
        if timing is None or not self.clock.running:
            return Realign.NONE
        self.ready_ns[slot] = t_ns
        if t_ns - self.clock.window_centre_ns() < -BLOCK_NS // 2:
            self.late.add(slot)  # it belongs to the tick before, whose step has run
        return timing.block_complete(t_ns, self.clock)

    def take_realignment(self, slot: int) -> Realign:
        """What to do with the slot's next input frame (a pending realignment is applied once, counted)."""
        timing = self.timing[slot]
        return Realign.NONE if timing is None else timing.take_realignment()

    def deadline_ns(self) -> int | None:
        """The latest moment the next step may run (the tick), None while no session is open."""
        return self.clock.tick_ns

    def should_step(self, now_ns: int) -> bool:
        tick = self.clock.tick_ns
        if tick is None:
            return False
        if self.late or now_ns >= tick:
            return True  # a catch-up step, or the tick (passed even with nothing ready: see take_step)
        waiting_for = [t for t, r in zip(self.timing, self.ready_ns, strict=True)
                       if t is not None and r is None and t.due(tick)]
        return not waiting_for and any(r is not None for r in self.ready_ns)

    def take_step(self, now_ns: int) -> list[ReadyBlock]:
        """The blocks the step now takes (possibly none: a tick with nothing ready still passes). A catch-up
        step takes only the late blocks and leaves the clock where it is; a tick's step takes every ready
        block, notes which due sessions missed it, and moves the clock to the next tick."""
        if self.late:
            blocks = [ReadyBlock(slot, self.ready_ns[slot]) for slot in sorted(self.late)]
            for slot in self.late:
                self.ready_ns[slot] = None
            self.late.clear()
            self.catch_up_steps += 1
            return blocks
        tick = self.clock.tick_ns
        assert tick is not None
        blocks = []
        for slot, timing in enumerate(self.timing):
            if timing is None:
                continue
            ready = self.ready_ns[slot]
            if ready is not None:
                blocks.append(ReadyBlock(slot, ready))
                self.ready_ns[slot] = None
            elif timing.due(tick):
                timing.missed()
        self.clock.advance(now_ns)
        return blocks


class ImmediateScheduler:
    """Steps every block the moment it is ready: no clock, no alignment. For the loopback engine, whose
    step costs nothing, and for `--step-clock off` (one or two sessions, lowest latency, a step each)."""

    def __init__(self, n_slots: int) -> None:
        self.ready_ns: list[int | None] = [None] * n_slots

    def open(self, slot: int, first_frame_ns: int) -> int:
        self.ready_ns[slot] = None
        return 0

    def close(self, slot: int) -> None:
        self.ready_ns[slot] = None

    def block_complete(self, slot: int, t_ns: int) -> Realign:
        self.ready_ns[slot] = t_ns
        return Realign.NONE

    def take_realignment(self, slot: int) -> Realign:
        return Realign.NONE

    def deadline_ns(self) -> int | None:
        return None

    def should_step(self, now_ns: int) -> bool:
        return any(r is not None for r in self.ready_ns)

    def take_step(self, now_ns: int) -> list[ReadyBlock]:
        blocks = [ReadyBlock(slot, r) for slot, r in enumerate(self.ready_ns) if r is not None]
        self.ready_ns = [None] * len(self.ready_ns)
        return blocks


Scheduler = StepScheduler | ImmediateScheduler
