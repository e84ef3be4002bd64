"""Waiting for any of many consumer-side rings that share one Doorbell.

A waiter wakes when a ring has an unread message (level-triggered: it stays ready until read), and
once when a ring's producer goes away, closed cleanly or exited (seen through a pidfd in the
doorbell's poll set); each departure is reported once per doorbell so a waiter that does not handle
it does not spin. Callers loop:

    while running:
        wait_any(rings, bell, timeout=0.1)
        for ring in rings:
            while (frame := ring.peek()) is not None:
                handle(frame)
                ring.release()
        # producer_alive() reads /proc: do it on a timeout or a wake-up that found nothing to read.

Only one waiter may wait on a given doorbell at a time.

asyncio: `await wait_any_async(rings, bell, timeout)` registers the doorbell's eventfd (and the
watched pidfds) with `loop.add_reader` for the duration of the wait; no thread per ring, no thread at
all. A long-lived server may instead register once:

    loop.add_reader(bell.fileno(), on_bell)       # on_bell(): bell.drain(); then scan the rings

(drain first, then scan, as wait_any does, so no publish is missed). That pattern does not see a
producer process die without a final publish; check `producer_alive()` on a timer, or also add
readers on `bell.watched_fds()` after `watch_producers(...)`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence

from ringbuf.doorbell import Doorbell
from ringbuf.ring import Ring

# Spinning costs CPU on every wait (spin_s per frame at 50 Hz = spin_s x 50 of a core) and the
# machines are 2-core, so the default is not to spin; latency-critical waiters opt in.
DEFAULT_SPIN_S = 0.0


def any_ready(rings: Sequence[Ring], bell: Doorbell) -> bool:
    """True if some ring has an unread message, or its producer has gone (closed or exited) since the
    last time this doorbell reported that. No syscalls."""
    exited = bell.exited_processes
    for ring in rings:
        reason = ring.wake_reason(exited)
        if reason is True or (reason and bell.first_report(reason)):
            return True
    return False


def watch_producers(rings: Sequence[Ring], bell: Doorbell) -> None:
    """Put each ring's bound producer process into the doorbell's poll set (once per process)."""
    for ring in rings:
        pid, start_time = ring.producer_key
        if pid != 0:
            bell.watch_process(pid, start_time)  # a dict lookup once the process is watched


def wait_any(
    rings: Sequence[Ring],
    bell: Doorbell,
    timeout: float | None,
    spin_s: float = DEFAULT_SPIN_S,
    *,
    watch_producer_processes: bool = True,
) -> bool:
    """Block until a ring is ready (True) or `timeout` seconds pass (False); None waits forever.

    Spins for up to `spin_s` first, yielding the CPU on each turn (sees a publish from another CPU
    within a few µs, at the price of a busy core meanwhile), then sleeps on the doorbell's eventfd,
    using no CPU, and wakes one scheduler wake-up after a publish (a few µs on the same CPU, tens of
    µs to an idle vCPU on these VMs; see bench/test_bench_ring.py).
    """
    # No lost wake-ups: producers ring AFTER publishing, the eventfd count only returns to 0 in a
    # drain, and every drain here is followed by a check of the rings. So any publish that a check
    # misses leaves the count > 0 and the next poll returns at once. A count left over from messages
    # already read (taken by the fast path without sleeping) costs one spurious poll + drain.
    if any_ready(rings, bell):
        return True
    now = time.perf_counter()
    deadline = None if timeout is None else now + timeout
    if spin_s > 0.0:
        spin_end = now + spin_s if deadline is None else min(now + spin_s, deadline)
        while time.perf_counter() < spin_end:
            # Yield, so a peer runnable on this same CPU runs now instead of after our spin.
            os.sched_yield()
            if any_ready(rings, bell):
                return True
    if watch_producer_processes:
        watch_producers(rings, bell)
    while True:
        if deadline is None:
            remaining = None
        else:
            remaining = deadline - time.perf_counter()
            if remaining <= 0.0:
                return any_ready(rings, bell)
        if bell.wait(remaining) and any_ready(rings, bell):  # wait() drained the count
            return True


async def wait_any_async(
    rings: Sequence[Ring], bell: Doorbell, timeout: float | None, *, watch_producer_processes: bool = True
) -> bool:
    """wait_any for an asyncio (or uvloop) loop: the doorbell's fds go to loop.add_reader while waiting."""
    if any_ready(rings, bell):
        return True
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        bell.drain()
        if any_ready(rings, bell):
            return True
        if watch_producer_processes:
            watch_producers(rings, bell)
        if deadline is None:
            remaining = None
        else:
            remaining = deadline - loop.time()
            if remaining <= 0.0:
                return False
        woken: asyncio.Future[int] = loop.create_future()
        fds = [bell.fileno(), *bell.watched_fds()]
        for fd in fds:
            loop.add_reader(fd, _wake, woken, fd)
        timer = None if remaining is None else loop.call_later(remaining, _wake, woken, -1)
        try:
            fired = await woken
        finally:
            for fd in fds:
                loop.remove_reader(fd)
            if timer is not None:
                timer.cancel()
        if fired not in (-1, bell.fileno()):
            bell.note_process_exit(fired)  # a watched producer process exited


def _wake(woken: asyncio.Future[int], fd: int) -> None:
    if not woken.done():
        woken.set_result(fd)
