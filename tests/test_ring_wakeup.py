"""Doorbells: blocked waiters wake on publish, one waiter serves many rings, asyncio via add_reader,
passing doorbells to spawned children, and no CPU while idle."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import statistics
import threading
import time

import pytest
import uvloop

from ringbuf import Doorbell, Policy, Ring, wait_any
from ringbuf.wait import wait_any_async
from tests.support import rings as ring_helpers
from tests.support.rings import TEST_PREFIX, wait_until_sleeping

SPAWN = multiprocessing.get_context("spawn")


# Every test leaves /dev/shm as it found it (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("no_leaked_segments")


@pytest.mark.parametrize("n_rings", [1, 64])
def test_a_sleeping_waiter_wakes_on_publish_to_any_of_its_rings(n_rings):
    rounds = 20
    rings = [Ring.create(64, 4, Policy.REFUSE, prefix=TEST_PREFIX) for _ in range(n_rings)]
    bell = Doorbell()
    for ring in rings:
        ring.bind_producer(bell)
    report, child_end = SPAWN.Pipe()
    child = SPAWN.Process(
        target=ring_helpers.wake_reporter, args=([r.spec for r in rings], bell, rounds, child_end)
    )
    child.start()
    try:
        assert report.recv() == "bound"
        latencies = []
        for k in range(rounds):
            target = (k * 37) % n_rings
            wait_until_sleeping(child.pid)  # the child is blocked in poll() on the doorbell
            message = time.perf_counter_ns().to_bytes(8, "little") + bytes([k])
            assert rings[target].try_write(message)
            woke = report.recv()
            assert woke is not None, "the waiter timed out: lost wake-up"
            index, data, latency_s = woke
            assert (index, data) == (target, message)
            latencies.append(latency_s)
        child.join(30)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
        for ring in rings:
            ring.close()
        bell.close()
    print(f"\n{n_rings} rings: publish -> waiter running, median {statistics.median(latencies) * 1e6:.0f} µs")
    assert max(latencies) < 1.0, "woken by the publish, not by a timeout"


def test_an_idle_wait_uses_no_cpu_and_times_out():
    with Ring.create(8, 2, prefix=TEST_PREFIX) as ring, Doorbell() as bell:
        ring.bind_consumer()
        # This thread's CPU: other threads of the test process (onnxruntime's, torch's) are not the wait's.
        cpu_before, wall_before = time.thread_time(), time.monotonic()
        assert wait_any([ring], bell, 0.3, spin_s=0.0) is False
        cpu, wall = time.thread_time() - cpu_before, time.monotonic() - wall_before
        assert wall >= 0.3
        assert cpu < 0.03, f"{cpu * 1e3:.1f} ms of CPU in a 300 ms idle wait"


def test_wait_any_returns_at_once_when_something_is_pending_and_spins_then_sleeps():
    with Ring.create(8, 2, prefix=TEST_PREFIX) as ring, Doorbell() as bell:
        ring.bind_producer(bell)
        ring.bind_consumer()
        assert wait_any([ring], bell, 0.05, spin_s=0.01) is False
        ring.try_write(b"x")
        assert wait_any([ring], bell, None, spin_s=0.01) is True
        assert wait_any([ring], bell, 0.0) is True


def test_a_doorbell_passed_to_a_spawned_child_rings_in_the_parent():
    with Doorbell() as bell:
        assert bell.wait(0) is False
        child = SPAWN.Process(target=ring_helpers.ring_the_bell, args=(bell, 3))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert bell.wait(0) is True, "rung from the child"
        assert bell.wait(0) is False, "wait() drained it"


def test_a_doorbell_sent_through_a_queue_to_a_running_child_works():
    """Outside spawning, DupFd goes through multiprocessing's resource_sharer."""
    with Doorbell() as bell:
        queue = SPAWN.Queue()
        report, child_end = SPAWN.Pipe()
        child = SPAWN.Process(target=ring_helpers.doorbell_from_queue, args=(queue, child_end))
        child.start()
        queue.put(bell)
        assert report.recv() == "rang"
        assert bell.wait(10) is True
        child.join(30)
        assert child.exitcode == 0


def test_a_closed_doorbell_refuses_to_ring():
    bell = Doorbell()
    bell.close()
    bell.close()  # idempotent
    assert bell.closed
    with pytest.raises(ValueError):
        bell.ring()
    with pytest.raises(ValueError):
        bell.wait(0)


@pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_asyncio_waits_on_many_rings_through_add_reader(loop_factory):
    rings = [Ring.create(64, 4, prefix=TEST_PREFIX) for _ in range(5)]
    bell = Doorbell()
    for ring in rings:
        ring.bind_consumer()
    commands, child_end = SPAWN.Pipe()
    child = SPAWN.Process(target=ring_helpers.producer_on_command, args=(rings[3].spec, bell, child_end))
    child.start()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        threads_before = threading.active_count()
        assert await wait_any_async(rings, bell, 0.05) is False, "nothing published: times out"
        assert not loop.remove_reader(bell.fileno()), "the reader was removed after the wait"

        waiter = asyncio.create_task(wait_any_async(rings, bell, 30.0))
        await asyncio.sleep(0)  # let the waiter register its reader (scheduling, not timing)
        assert threading.active_count() == threads_before, "no helper threads"
        commands.send(b"frame")  # the child publishes on ring 3 and rings the bell
        assert await waiter is True
        assert rings[3].read_bytes() == b"frame"

        waiter = asyncio.create_task(wait_any_async(rings, bell, 30.0))
        await asyncio.sleep(0)
        os.kill(child.pid, signal.SIGKILL)  # the watched pidfd wakes the loop
        assert await waiter is True
        assert not rings[3].producer_alive()

    try:
        assert commands.recv() == "bound"
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(scenario())
    finally:
        child.kill()
        child.join()
        for ring in rings:
            ring.close()
        bell.close()
