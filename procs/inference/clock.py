"""When the inference process steps, and how each session's 80 ms blocks are kept in time with the steps.

Pure logic, no clock reads: every method takes the time it is asked about (`time.monotonic_ns()` values).

The step clock
--------------
A batched step costs the same whatever the number of live slots (a masked slot costs as much as a live
one), and one step per 80 ms is all the audio needs, so the inference process steps on **one clock**: a tick
every 80 ms of its own monotonic time while any session is open, none otherwise. The step for a tick takes
the oldest queued block of every slot. It runs at the tick at the latest, and earlier as soon as every
session whose block is expected by the tick has one queued (so a ready block waits as little as possible);
either way the next tick is 80 ms after this one, so there is exactly one step per tick.

A session's clock is read from its frames, not from when a block happened to complete
---------------------------------------------------------------------------------------
A client sends frame `seq` (20 ms of its audio each) no earlier than its sound card filled it; the network
may hold it back (jitter, a clump of Wi-Fi frames, TCP coalescing, an Ogg page of 80 ms) but never deliver it
early. So `arrival - seq x 20 ms` is bounded below by the client's clock, and the lowest value of it over
the last couple of seconds (`ArrivalLine`) is where the session's frames would arrive if sent one by one
on time: its **arrival line**. Bursts and jitter only ever lift frames above the line, so they do not move
it; drift moves it, slowly (300 ppm is 0.6 ms in 2 s). A block's *nominal* completion is the line at the
seq of its last frame.

Keeping sessions in time
------------------------
Each session's nominal block completions are kept in a window before the tick,

    [tick - lead - 20 ms, tick - lead]          (within ±10 ms of its centre, tick - lead - 10 ms)

`lead` leaves room for jitter above the line, so a smooth session's block does not miss its tick. A new
session is placed once its first block completes (so the line has seen four frames: a client that sends
pages of up to 80 ms has sent at least one of them on time by then): the next 0-3 of its frames are
skipped so that its blocks complete nearest the window's centre; the first session starts the clock there.
Afterwards, when the nominal phase (on the 80 ms circle) leaves the window by more than `hysteresis`, one
input frame is repeated (the blocks complete 20 ms earlier) or dropped (20 ms later), and that realignment
is counted. Drift alone therefore costs one realignment per 20 ms it accumulates, about one a minute at
300 ppm; bursts cost none, since moving a block boundary by one frame moves the nominal phase by exactly
20 ms and nothing else moves it.

Queues, late blocks and catch-up
--------------------------------
A block that completes after its tick's step (its frames came in a burst later than the line, or jitter
exceeded the lead) is queued and waits for the next tick: a bursty session waits at most one block longer
than a smooth one. A slot may hold several blocks (a burst of eight frames brings two): each tick takes
the oldest, so nothing a burst brings is dropped. A slot that holds two or more blocks at *every* tick for
`backlog_ticks` in a row, or two or more at its first tick (blocks that came before its first tick, such as
audio a client sent before it was admitted), is behind for good (a stall that the client made up, a jitter
spike that put it a block back), not bursty (whose queue empties between bursts): it gets catch-up steps,
one block each, for what it holds beyond one block. Only a slot whose queue outgrows `max_queued_blocks`
(the model cannot keep up) loses its oldest block, counted as dropped input.

Slot states (`StepScheduler`): none (no session) -> placing (first block not complete: its frames are fed,
not timed) -> timed (placed; realigned for drift) -> none (closed). A session whose link dropped goes back
to placing (`replace`): it sends nothing while detached, and is placed anew if it resumes.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from protocol.constants import FRAME_MS, FRAMES_PER_BLOCK

FRAME_NS = FRAME_MS * 1_000_000
BLOCK_NS = FRAMES_PER_BLOCK * FRAME_NS

P = TypeVar("P")


@dataclass(frozen=True)
class ClockRules:
    # A block's nominal completion sits this long (plus half a frame) before its tick: room for jitter above
    # the arrival line plus the hysteresis. It costs no wait while every session comes (the step runs as
    # soon as all are in), only when one does not: then the others wait for it until the tick.
    lead_ns: int = 15_000_000
    hysteresis_ns: int = 5_000_000  # how far past the window's edge the nominal phase may go
    settle_blocks: int = 12  # no realignment before the line has seen this many blocks (~1 s)
    line_frames: int = 100  # the arrival line: lowest `arrival - seq x 20 ms` over this many frames (2 s)
    lateness_blocks: int = 12  # how far back a slot's usual lateness above its line is remembered
    backlog_ticks: int = 12  # ≥ 2 blocks queued at every tick for this many ticks (~1 s): behind, caught up
    max_queued_blocks: int = 8  # past this (640 ms) the oldest queued block is dropped: the model lags
    owed_ticks: int = 2  # past ticks still stepped, back to back, when the clock moves on after a long step


class Feed(enum.Enum):
    """What to do with a session's next input frame, and how many times it goes into the block."""

    ONCE = "once"
    SKIP = "skip"  # placing a new session: not fed, not counted as a realignment
    REPEAT = "repeat"  # realignment: fed twice, the blocks complete 20 ms earlier
    DROP = "drop"  # realignment: not fed, the blocks complete 20 ms later

    @property
    def times(self) -> int:
        return {"once": 1, "skip": 0, "repeat": 2, "drop": 0}[self.value]


def circular(delta_ns: float, period_ns: int = BLOCK_NS) -> float:
    """`delta_ns` on a circle of `period_ns`, in (-period/2, period/2]."""
    half = period_ns / 2
    return -((-delta_ns + half) % period_ns - half)


class ArrivalLine:
    """The lowest `t_ns - seq x FRAME_NS` over the last `window` frames: where the session's frames arrive
    when nothing holds them back (a monotonic deque: O(1) per frame)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._lows: deque[tuple[int, int]] = deque()  # (seq, offset), offsets increasing

    def add(self, seq: int, t_ns: int) -> None:
        offset = t_ns - seq * FRAME_NS
        while self._lows and self._lows[-1][1] >= offset:
            self._lows.pop()
        self._lows.append((seq, offset))
        while self._lows[0][0] <= seq - self.window:
            self._lows.popleft()

    def at(self, seq: int) -> int:
        """When frame `seq` arrives on the line."""
        assert self._lows, "no frame yet"
        return self._lows[0][1] + seq * FRAME_NS


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
        """The step for this tick runs now (`now_ns`: its start): the next tick is 80 ms later. A next tick
        already past is still owed (its step runs at once, so a model a little faster than real time works
        off a backlog back to back), but at most `owed_ticks` ticks may lie in the past when the clock moves
        on: beyond that the model cannot keep up, the older ones are skipped (`missed_ticks`), and the queues'
        bound decides what is dropped."""
        assert self.tick_ns is not None
        self.tick_ns += BLOCK_NS
        behind = (now_ns - self.tick_ns) // BLOCK_NS + 1 - self.rules.owed_ticks
        if behind > 0:
            self.tick_ns += behind * BLOCK_NS
            self.missed_ticks += behind

    def placement_skip(self, block_complete_ns: int) -> int:
        """Frames (0-3) to skip after a block that completed at `block_complete_ns` so the blocks after it
        complete nearest the window's centre."""
        return min(range(FRAMES_PER_BLOCK),
                   key=lambda k: abs(self.phase_ns(block_complete_ns + k * FRAME_NS)))


class SessionTiming:
    """One session's frames against the clock: its arrival line, its placement, its realignments, when
    its next block is expected."""

    def __init__(self, rules: ClockRules | None = None) -> None:
        self.rules = rules or ClockRules()
        self.line = ArrivalLine(self.rules.line_frames)
        self.blocks = 0
        self.skip = 0  # frames still to skip to place the session
        self.skipped = 0  # frames skipped to place it (for clients that map answers to their blocks)
        self.pending: Feed = Feed.ONCE  # a realignment decided, for the next frame
        self.realigned = 0
        self.phase_ns: float | None = None  # the last block's nominal phase
        self.next_nominal_ns: int | None = None  # when its next block should complete on the line
        self.missed = False  # it missed a tick: not waited for until its next block comes
        self._lateness: deque[int] = deque(maxlen=self.rules.lateness_blocks)  # arrival - nominal, per block

    @property
    def placed(self) -> bool:
        return self.blocks > 0

    def frame(self, seq: int, t_ns: int) -> Feed:
        """A frame of the session arrived (at the network process at `t_ns`): how to feed it."""
        self.line.add(seq, t_ns)
        if self.skip:
            self.skip -= 1
            self.skipped += 1
            return Feed.SKIP
        feed, self.pending = self.pending, Feed.ONCE
        if feed is not Feed.ONCE:
            self.realigned += 1
            if self.next_nominal_ns is not None:
                self.next_nominal_ns += FRAME_NS if feed is Feed.DROP else -FRAME_NS
        return feed

    def block_complete(self, seq: int, t_ns: int, clock: StepClock) -> None:
        """Frame `seq`, which arrived at `t_ns`, completed a block."""
        nominal = self.line.at(seq)
        self.blocks += 1
        self.missed = False
        self._lateness.append(t_ns - nominal)
        if self.blocks == 1:  # placing: the first session starts the clock here
            if not clock.running:
                clock.start(nominal)
            self.skip = clock.placement_skip(nominal)
            self.next_nominal_ns = nominal + self.skip * FRAME_NS + BLOCK_NS
            self.phase_ns = clock.phase_ns(self.next_nominal_ns)
            return
        self.next_nominal_ns = nominal + BLOCK_NS
        self.phase_ns = phase = clock.phase_ns(nominal)
        if self.blocks < self.rules.settle_blocks or self.pending is not Feed.ONCE:
            return
        limit = FRAME_NS / 2 + self.rules.hysteresis_ns
        if phase > limit:
            self.pending = Feed.REPEAT
        elif phase < -limit:
            self.pending = Feed.DROP

    def awaited(self, tick_ns: int) -> bool:
        """Is this session's next block expected by the tick (so the step may wait for it until then)? Its
        usual lateness above the line counts: a session whose blocks come in bursts after their tick is not
        waited for (its block joins the next tick)."""
        if self.missed or self.next_nominal_ns is None:
            return False
        return self.next_nominal_ns + self.usual_lateness_ns() <= tick_ns

    def usual_lateness_ns(self) -> int:
        """How far above its line this session's blocks usually complete: the 75th percentile of the last
        `lateness_blocks` (a clump pattern repeats within them; one spike of jitter is not usual)."""
        if not self._lateness:
            return 0
        ordered = sorted(self._lateness)
        return ordered[(3 * (len(ordered) - 1)) // 4]


@dataclass(frozen=True, slots=True)
class ReadyBlock(Generic[P]):
    slot: int
    ready_ns: int  # when the last frame of the block reached the server
    payload: P  # what the caller queued with it (the block's audio)


@dataclass
class _Slot(Generic[P]):
    timing: SessionTiming
    queue: deque[ReadyBlock[P]] = field(default_factory=deque)
    depths: deque[int] = field(default_factory=deque)  # its queue's depth at the last ticks
    catch_up: int = 0  # blocks to take in catch-up steps
    ticks: int = 0  # ticks since it was placed


class StepScheduler(Generic[P]):
    """The step clock and every open session's timing and queued blocks: when to step, which blocks a step
    takes.

    The inference loop tells it what happened (a session opened or closed, a frame came, a block completed)
    and asks how to feed each frame (`frame`), when the next step is due (`deadline_ns`) and whether to step
    now (`should_step`); `take_step` then hands over the blocks the step takes and moves the clock on."""

    def __init__(self, n_slots: int, rules: ClockRules | None = None) -> None:
        self.rules = rules or ClockRules()
        self.clock = StepClock(self.rules)
        self.slots: list[_Slot[P] | None] = [None] * n_slots
        self.catch_up_steps = 0

    def open(self, slot: int) -> None:
        """A session starts in `slot`."""
        self.slots[slot] = _Slot(SessionTiming(self.rules), depths=deque(maxlen=self.rules.backlog_ticks))

    def close(self, slot: int) -> None:
        self.slots[slot] = None
        if all(s is None for s in self.slots):
            self.clock.stop()

    def replace(self, slot: int) -> None:
        """The slot's session stops sending for a while (its link dropped; it may resume): it is no longer
        awaited, and its next block places it on the clock as a first block would. Its queued blocks stay:
        they are audio the session did send."""
        s = self.slots[slot]
        if s is not None:
            s.timing = SessionTiming(self.rules)
            s.depths.clear()
            s.catch_up = s.ticks = 0

    def timing(self, slot: int) -> SessionTiming | None:
        s = self.slots[slot]
        return None if s is None else s.timing

    def frame(self, slot: int, seq: int, t_ns: int) -> Feed:
        """A frame of the slot's session arrived: how to feed it into its blocks."""
        s = self.slots[slot]
        return Feed.ONCE if s is None else s.timing.frame(seq, t_ns)

    def block_complete(self, slot: int, seq: int, t_ns: int, payload: P) -> int:
        """Frame `seq` (arrived at `t_ns`) completed a block of `slot`: it is queued for a step. Returns how
        many queued blocks were dropped to make room (0 or 1)."""
        s = self.slots[slot]
        if s is None:
            return 0
        s.timing.block_complete(seq, t_ns, self.clock)
        s.queue.append(ReadyBlock(slot, t_ns, payload))
        if len(s.queue) > self.rules.max_queued_blocks:
            s.queue.popleft()
            return 1
        return 0

    def queued(self, slot: int) -> int:
        s = self.slots[slot]
        return 0 if s is None else len(s.queue)

    def deadline_ns(self) -> int | None:
        """The latest moment the next step may run (the tick), None while no session is open."""
        return self.clock.tick_ns

    def should_step(self, now_ns: int) -> bool:
        tick = self.clock.tick_ns
        if tick is None:
            return False
        open_slots = [s for s in self.slots if s is not None]
        if any(s.catch_up and s.queue for s in open_slots):
            return True
        if now_ns >= tick:
            return True  # the tick (passed even with nothing queued: see take_step)
        if any(s.timing.awaited(tick) for s in open_slots):  # an older queued block does not stand in for it
            return False
        return any(s.queue for s in open_slots)

    def take_step(self, now_ns: int) -> list[ReadyBlock[P]]:
        """The blocks the step now takes (possibly none: a tick with nothing queued still passes). A catch-up
        step takes one block of each slot that is behind and leaves the clock where it is; a tick's step takes
        the oldest block of every slot, notes which awaited sessions missed it, and moves the clock on."""
        behind = [s for s in self.slots if s is not None and s.catch_up and s.queue]
        if behind:
            self.catch_up_steps += 1
            for s in behind:
                s.catch_up -= 1
            return [s.queue.popleft() for s in behind]
        tick = self.clock.tick_ns
        assert tick is not None
        blocks = []
        for s in self.slots:
            if s is None or not s.timing.placed:
                if s is not None and s.queue:  # blocks a session sent before its link dropped (`replace`)
                    blocks.append(s.queue.popleft())
                continue
            s.depths.append(len(s.queue))
            s.ticks += 1
            if s.ticks == 1 and len(s.queue) >= 2:
                s.catch_up += len(s.queue) - 1  # its first block (before it was placed) missed its tick
                s.depths.clear()
            elif len(s.depths) == s.depths.maxlen and (least := min(s.depths)) >= 2:
                s.catch_up += least - 1  # behind for good, not bursty: its queue never emptied
                s.depths.clear()
            if s.queue:
                blocks.append(s.queue.popleft())
            elif s.timing.awaited(tick):
                s.timing.missed = True
            s.catch_up = min(s.catch_up, len(s.queue))  # what the tick took is not owed to a catch-up step
        self.clock.advance(now_ns)
        return blocks


class ImmediateScheduler(Generic[P]):
    """Steps every block the moment it is ready: no clock, no alignment. For the loopback engine, whose
    step costs nothing, and for `--step-clock off` (one or two sessions, lowest latency, a step each)."""

    def __init__(self, n_slots: int, rules: ClockRules | None = None) -> None:
        self.rules = rules or ClockRules()
        self.queues: list[deque[ReadyBlock[P]]] = [deque() for _ in range(n_slots)]

    def open(self, slot: int) -> None:
        self.queues[slot].clear()

    def close(self, slot: int) -> None:
        self.queues[slot].clear()

    def replace(self, slot: int) -> None:
        pass  # no clock to place it on

    def timing(self, slot: int) -> SessionTiming | None:
        return None

    def frame(self, slot: int, seq: int, t_ns: int) -> Feed:
        return Feed.ONCE

    def block_complete(self, slot: int, seq: int, t_ns: int, payload: P) -> int:
        queue = self.queues[slot]
        queue.append(ReadyBlock(slot, t_ns, payload))
        if len(queue) > self.rules.max_queued_blocks:
            queue.popleft()
            return 1
        return 0

    def queued(self, slot: int) -> int:
        return len(self.queues[slot])

    def deadline_ns(self) -> int | None:
        return None

    def should_step(self, now_ns: int) -> bool:
        return any(self.queues)

    def take_step(self, now_ns: int) -> list[ReadyBlock[P]]:
        return [queue.popleft() for queue in self.queues if queue]


Scheduler = StepScheduler | ImmediateScheduler
