"""Child-process entry points and shared helpers for the ringbuf tests.

Children are started with the spawn method, so everything here must be importable (module level) and
its arguments picklable: RingSpec, Doorbell (DupFd at spawn), multiprocessing Connections.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from ringbuf import Doorbell, Ring, RingSpec, wait_any
from ringbuf.procinfo import PeerState, read_proc_stat

TEST_PREFIX = "vrtest"  # segments made by these tests; leak checks look for it
REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 30.0  # a child waiting this long means a lost wake-up: fail loudly, never hang


def segments_with_prefix(prefix: str) -> list[str]:
    return sorted(name for name in os.listdir("/dev/shm") if name.startswith(prefix + "-"))


def wait_until_sleeping(pid: int, timeout_s: float = CHILD_TIMEOUT_S) -> None:
    """Spin (yielding the CPU) until the process is in interruptible sleep, e.g. blocked in poll()."""
    deadline = time.monotonic() + timeout_s
    while True:
        stat = read_proc_stat(pid)
        if stat is not None and stat.state == "S":
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} never went to sleep (state {stat})")
        os.sched_yield()


# -- deterministic, self-checking frames: counter + pattern -------------------------------------------
class FramePattern:
    """Frame i is `i` as u64 little-endian, then bytes cut from a fixed random table at an offset
    depending on i; its length also depends on i. Any torn, stale, shifted or mis-sized frame fails."""

    def __init__(self, slot_size: int, min_len: int = 8, seed: int = 1234) -> None:
        if slot_size < 8 or not 8 <= min_len <= slot_size:
            raise ValueError("frames need at least 8 bytes for the counter")
        self.slot_size = slot_size
        self.min_len = min_len
        self._table = np.random.default_rng(seed).integers(0, 256, slot_size + 257, dtype=np.uint8).tobytes()

    def length(self, i: int) -> int:
        return self.min_len + (i * 7919) % (self.slot_size - self.min_len + 1)

    def frame(self, i: int) -> bytes:
        offset = i % 257
        return i.to_bytes(8, "little") + self._table[offset : offset + self.length(i) - 8]


def write_blocking(ring: Ring, data: bytes) -> int:
    """try_write until accepted; returns how many attempts were refused. The reader frees space, so
    this spins yielding the CPU (there is no doorbell for space, by design)."""
    refused = 0
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not ring.try_write(data):
        refused += 1
        if refused % 1024 == 0 and time.monotonic() > deadline:
            raise TimeoutError("ring stayed full: is the consumer alive?")
        os.sched_yield()
    return refused


# -- child entry points --------------------------------------------------------------------------------
def stream_producer(spec: RingSpec, bell: Doorbell, n_frames: int, result: Connection) -> None:
    """Publish frames 0..n-1 of FramePattern in place (reserve/publish); report refused attempts."""
    pattern = FramePattern(spec.slot_size)
    with Ring.attach(spec) as ring:
        ring.bind_producer(bell)
        refused = 0
        for i in range(n_frames):
            frame = pattern.frame(i)
            while (slot := ring.reserve()) is None:
                refused += 1
                os.sched_yield()
            slot[: len(frame)] = np.frombuffer(frame, dtype=np.uint8)
            ring.publish(len(frame))
        result.send(refused)


def stream_consumer(spec: RingSpec, bell: Doorbell, n_frames: int, result: Connection) -> None:
    """Check every frame arrives once, in order, intact; report (frames ok, first error or None)."""
    pattern = FramePattern(spec.slot_size)
    with Ring.attach(spec) as ring:
        ring.bind_consumer()
        expected = 0
        error = None
        while expected < n_frames and error is None:
            if not wait_any([ring], bell, CHILD_TIMEOUT_S):
                error = f"timed out waiting for frame {expected}"
                break
            got_any = False
            while (view := ring.peek()) is not None:
                if view.tobytes() != pattern.frame(expected):
                    error = f"frame {expected} wrong: got {view[:8].tobytes()!r}..., {len(view)} bytes"
                    break
                ring.release()
                expected += 1
                got_any = True
            if not got_any and ring.producer_state() in (PeerState.CLOSED, PeerState.DEAD):
                error = f"producer gone after {expected} frames"
        result.send((expected, error))


def lossy_flood_producer(spec: RingSpec, bell: Doorbell, n_frames: int, done: Connection) -> None:
    """Flood a DROP_OLDEST ring as fast as possible, then close the producer side cleanly."""
    pattern = FramePattern(spec.slot_size)
    with Ring.attach(spec) as ring:
        ring.bind_producer(bell)
        for i in range(n_frames):
            ring.try_write(pattern.frame(i))
        done.send(ring.written)
    # leaving the with-block unbinds: the consumer sees PeerState.CLOSED


def lossy_checking_consumer(spec: RingSpec, bell: Doorbell, result: Connection) -> None:
    """Verify frames ON the zero-copy view, then release(); a frame that failed verification yet was
    released as intact would be silent corruption. Reports counts and the accepted frame indices."""
    pattern = FramePattern(spec.slot_size)
    accepted: list[int] = []
    overwritten_while_held = 0
    peeks = 0
    torn_reads_seen = 0  # checks that saw a mix of frames: each must come with release() False
    silent_corruptions = 0
    with Ring.attach(spec) as ring:
        ring.bind_consumer()
        result.send("bound")
        while True:
            if not wait_any([ring], bell, CHILD_TIMEOUT_S):
                break
            producer_done = ring.producer_state() in (PeerState.CLOSED, PeerState.DEAD)
            while (view := ring.peek()) is not None:
                index = int.from_bytes(view[:8].tobytes(), "little")
                expected = pattern.frame(index)
                peeks += 1
                if peeks % 16 == 0:
                    # Deterministic overlap whatever the scheduling: check half the frame, let the
                    # producer lap the ring (it floods; this ends when it is done), check the rest.
                    half = len(view) // 2
                    looks_right = view[:half].tobytes() == expected[:half]
                    deadline = time.monotonic() + 5.0
                    while ring.written <= index + spec.capacity and time.monotonic() < deadline:
                        os.sched_yield()
                    looks_right = looks_right and view[half:].tobytes() == expected[half:]
                else:
                    # Compare in 16-byte steps: slow on purpose, so a producer running in parallel
                    # often overwrites the slot mid-check (and the check sees a mix of two frames).
                    looks_right = len(view) == len(expected) and all(
                        view[k : k + 16].tobytes() == expected[k : k + 16] for k in range(0, len(view), 16)
                    )
                torn_reads_seen += not looks_right
                if ring.release():
                    accepted.append(index)
                    silent_corruptions += not looks_right
                else:
                    overwritten_while_held += 1
            if producer_done:
                break
        counts = (overwritten_while_held, torn_reads_seen, silent_corruptions, ring.consumed, ring.dropped)
        result.send((accepted, *counts))


def collector(commands: Connection, bell: Doorbell) -> None:
    """Reusable consumer for many rings in turn: for each RingSpec received, attach, say "bound",
    read until the producer closes, then send back every message read. None ends the child."""
    while (spec := commands.recv()) is not None:
        received: list[bytes] = []
        error = None
        with Ring.attach(spec) as ring:
            ring.bind_consumer()
            commands.send("bound")
            while True:
                if not wait_any([ring], bell, CHILD_TIMEOUT_S):
                    error = "timed out"
                    break
                # Check "closed" BEFORE the last drain: the producer stores its closed flag after its
                # final write index, so a drain after seeing the flag gets everything.
                producer_done = ring.producer_state() in (PeerState.CLOSED, PeerState.DEAD)
                while (data := ring.read_bytes()) is not None:
                    received.append(data)
                if producer_done:
                    break
            commands.send((received, error))


def wake_reporter(specs: list[RingSpec], bell: Doorbell, rounds: int, report: Connection) -> None:
    """Wait on many rings with one doorbell; for each wake-up report (ring index, message, latency s).

    Each message carries the publisher's time.perf_counter_ns() (CLOCK_MONOTONIC, system-wide)."""
    rings = [Ring.attach(spec) for spec in specs]
    for ring in rings:
        ring.bind_consumer()
    report.send("bound")
    for _ in range(rounds):
        if not wait_any(rings, bell, CHILD_TIMEOUT_S, spin_s=0.0):
            report.send(None)
            return
        woke_ns = time.perf_counter_ns()
        for index, ring in enumerate(rings):
            data = ring.read_bytes()
            if data is not None:
                sent_ns = int.from_bytes(data[:8], "little")
                report.send((index, data, (woke_ns - sent_ns) / 1e9))
                break
    for ring in rings:
        ring.close()


def bound_then_block(spec: RingSpec, side: str, bell: Doorbell | None, ready: Connection) -> None:
    """Bind as `side` ("producer" or "consumer"), publish one message if producer, say "ready", then
    block on the connection until killed (or told to close cleanly with "close")."""
    ring = Ring.attach(spec)
    if side == "producer":
        ring.bind_producer(bell)
        ring.try_write(b"hello")
    else:
        ring.bind_consumer()
    ready.send("ready")
    if ready.recv() == "close":
        ring.close()
        ready.send("closed")


def ring_the_bell(bell: Doorbell, times: int) -> None:
    for _ in range(times):
        bell.ring()


def doorbell_from_queue(queue: object, report: Connection) -> None:
    """Receive a Doorbell through a Queue (pickled outside spawning: resource_sharer) and ring it."""
    bell = queue.get()  # type: ignore[attr-defined]
    bell.ring()
    report.send("rang")


def producer_on_command(spec: RingSpec, bell: Doorbell, commands: Connection) -> None:
    """Publish one message per command received (bytes), until None."""
    with Ring.attach(spec) as ring:
        ring.bind_producer(bell)
        commands.send("bound")
        while (data := commands.recv()) is not None:
            ring.try_write(data)


def attach_and_exit(spec: RingSpec) -> None:
    """Attach, bind, write, and exit WITHOUT closing (normal interpreter exit)."""
    ring = Ring.attach(spec)
    ring.bind_producer()
    ring.try_write(b"bye")
