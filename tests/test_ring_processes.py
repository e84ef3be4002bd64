"""Rings between real spawned processes: ordering and integrity, both policies, peer death."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringbuf import Doorbell, Policy, Ring, wait_any
from ringbuf.procinfo import PeerState
from tests.support import rings as ring_helpers
from tests.support.rings import TEST_PREFIX, FramePattern, write_blocking

SPAWN = multiprocessing.get_context("spawn")
JOIN_TIMEOUT_S = 60.0


# Every test leaves /dev/shm as it found it (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("no_leaked_segments")


def join_all(*processes: multiprocessing.process.BaseProcess) -> None:
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            process.join()
        assert process.exitcode == 0, f"{process.name} exited with {process.exitcode}"


def test_a_million_frames_arrive_once_in_order_and_intact():
    """Two spawned processes, a 8-slot ring: 1,000,000 frames of 8..64 bytes (counter + pattern)."""
    n_frames = 1_000_000
    with Ring.create(64, 8, Policy.REFUSE, prefix=TEST_PREFIX) as ring, Doorbell() as bell:
        producer_result, producer_end = SPAWN.Pipe(duplex=False)
        consumer_result, consumer_end = SPAWN.Pipe(duplex=False)
        consumer = SPAWN.Process(
            target=ring_helpers.stream_consumer, args=(ring.spec, bell, n_frames, consumer_end)
        )
        producer = SPAWN.Process(
            target=ring_helpers.stream_producer, args=(ring.spec, bell, n_frames, producer_end)
        )
        consumer.start()
        producer.start()
        assert consumer_result.poll(120), "consumer reported nothing"
        received, error = consumer_result.recv()
        refused = producer_result.recv()
        join_all(producer, consumer)
        assert error is None
        assert received == n_frames
        assert (ring.written, ring.consumed, ring.dropped, ring.refused) == (n_frames, n_frames, 0, refused)
        assert ring.producer_state() is PeerState.CLOSED and ring.consumer_state() is PeerState.CLOSED


def test_drop_oldest_under_flood_never_hands_out_a_torn_frame():
    """The consumer verifies each frame on the zero-copy view, then release(); the producer floods a
    4-slot ring. Frames overwritten while held must be reported by release(), never accepted."""
    n_frames = 200_000
    with Ring.create(256, 4, Policy.DROP_OLDEST, prefix=TEST_PREFIX) as ring, Doorbell() as bell:
        consumer_result, consumer_end = SPAWN.Pipe(duplex=False)
        producer_done, producer_end = SPAWN.Pipe(duplex=False)
        consumer = SPAWN.Process(
            target=ring_helpers.lossy_checking_consumer, args=(ring.spec, bell, consumer_end)
        )
        consumer.start()
        assert consumer_result.recv() == "bound"
        producer = SPAWN.Process(
            target=ring_helpers.lossy_flood_producer, args=(ring.spec, bell, n_frames, producer_end)
        )
        producer.start()
        assert producer_done.recv() == n_frames
        accepted, overwritten_while_held, torn_reads, silent_corruptions, consumed, dropped = (
            consumer_result.recv()
        )
        join_all(producer, consumer)
    print(f"accepted {consumed}, dropped {dropped}: {overwritten_while_held} overwritten while held,")
    print(f"{torn_reads} of them caught mid-overwrite by the checker; silently corrupt: {silent_corruptions}")
    assert silent_corruptions == 0
    assert overwritten_while_held > 0, "the race this test is about did happen"
    assert accepted == sorted(set(accepted)), "in order, no duplicates"
    assert accepted[-1] == n_frames - 1, "the newest frame survives"
    assert consumed == len(accepted)
    assert consumed + dropped == n_frames


@pytest.fixture(scope="module")
def collector_child():
    """One consumer child reused by every Hypothesis example (spawning costs ~0.3 s)."""
    bell = Doorbell()
    commands, child_end = SPAWN.Pipe()
    child = SPAWN.Process(target=ring_helpers.collector, args=(child_end, bell))
    child.start()
    yield commands, bell
    commands.send(None)
    join_all(child)
    bell.close()


BURSTS = st.lists(st.tuples(st.integers(1, 40), st.booleans()), min_size=1, max_size=12)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    slot_size=st.integers(8, 2048),
    capacity=st.integers(1, 32),
    policy=st.sampled_from(Policy),
    bursts=BURSTS,
)
def test_bursts_through_a_child_consumer(collector_child, slot_size, capacity, policy, bursts):
    """Bursts of (n messages, then wait for the consumer to catch up or not)."""
    commands, bell = collector_child
    pattern = FramePattern(slot_size)
    sent: list[bytes] = []
    refused = 0
    with Ring.create(slot_size, capacity, policy, prefix=TEST_PREFIX) as ring:
        ring.bind_producer(bell)
        commands.send(ring.spec)
        assert commands.recv() == "bound"
        for burst, wait_for_consumer in bursts:
            for _ in range(burst):
                frame = pattern.frame(len(sent))
                if policy is Policy.REFUSE:
                    refused += write_blocking(ring, frame)
                else:
                    assert ring.try_write(frame)
                sent.append(frame)
            deadline = time.monotonic() + 30
            while wait_for_consumer and ring.pending() and time.monotonic() < deadline:
                os.sched_yield()
        ring.unbind()  # clean close: the collector drains and reports
        received, error = commands.recv()
        assert error is None
        written, consumed, dropped = ring.written, ring.consumed, ring.dropped
        assert ring.refused == refused
    assert written == len(sent) and consumed == len(received)
    if policy is Policy.REFUSE:
        assert received == sent and dropped == 0
    else:
        indices = [int.from_bytes(frame[:8], "little") for frame in received]
        assert indices == sorted(set(indices)), "in order, no duplicates"
        assert all(frame == sent[i] for frame, i in zip(received, indices, strict=True)), "intact"
        assert set(range(max(0, len(sent) - capacity), len(sent))) <= set(indices), "newest kept"
        assert consumed + dropped == len(sent)


def start_bound_child(ring: Ring, side: str, bell: Doorbell | None):
    control, child_end = SPAWN.Pipe()
    child = SPAWN.Process(target=ring_helpers.bound_then_block, args=(ring.spec, side, bell, child_end))
    child.start()
    assert control.recv() == "ready"
    return child, control


def test_consumer_sees_a_killed_producer_and_its_wait_wakes_promptly():
    with Ring.create(16, 4, prefix=TEST_PREFIX) as ring, Doorbell() as bell:
        ring.bind_consumer()
        child, _control = start_bound_child(ring, "producer", bell)
        assert ring.read_bytes() == b"hello"
        assert ring.producer_alive()
        assert not wait_any([ring], bell, 0.01), "empty ring, live producer: times out"
        os.kill(child.pid, signal.SIGKILL)
        started = time.monotonic()
        assert wait_any([ring], bell, 30.0), "the pidfd in the poll set wakes the waiter"
        woke_after = time.monotonic() - started
        assert not wait_any([ring], bell, 0.01), "reported once: a waiter that ignores it does not spin"
        assert not ring.producer_alive(), "dead although not reaped yet (a zombie)"
        assert ring.producer_state() is PeerState.DEAD
        child.join()
        assert child.exitcode == -signal.SIGKILL
        assert woke_after < 5.0


def test_producer_sees_a_killed_consumer():
    with Ring.create(16, 4, prefix=TEST_PREFIX) as ring:
        ring.bind_producer()
        child, _control = start_bound_child(ring, "consumer", None)
        assert ring.consumer_alive()
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert not ring.consumer_alive() and ring.consumer_state() is PeerState.DEAD
        assert ring.producer_alive(), "this side is unaffected"


def test_a_cleanly_closing_producer_wakes_the_waiter_and_reads_as_closed():
    with Ring.create(16, 4, prefix=TEST_PREFIX) as ring, Doorbell() as bell:
        ring.bind_consumer()
        child, control = start_bound_child(ring, "producer", bell)
        assert ring.read_bytes() == b"hello"
        bell.drain()
        control.send("close")
        assert control.recv() == "closed"
        assert bell.wait(0), "closing the producer side rings the bell"
        assert wait_any([ring], bell, 0), "a closed producer wakes the waiter..."
        assert not wait_any([ring], bell, 0), "...once"
        assert ring.producer_state() is PeerState.CLOSED
        join_all(child)
        assert ring.producer_state() is PeerState.CLOSED, "closed stays closed after the exit"
