"""Single-process behaviour of Ring: layout, API contract, both full-ring policies, exact counters."""

from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringbuf import Policy, Ring, RingSpec
from ringbuf.procinfo import PeerState, peer_state, process_start_time
from ringbuf.segment import SHM_DIR
from tests.support.rings import TEST_PREFIX

# Every test leaves /dev/shm as it found it (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("no_leaked_segments")


def make_pair(slot_size: int = 32, capacity: int = 4, policy: Policy = Policy.REFUSE) -> tuple[Ring, Ring]:
    """Owner handle as producer, a second attached handle as consumer (as in two processes)."""
    producer = Ring.create(slot_size, capacity, policy, prefix=TEST_PREFIX)
    consumer = Ring.attach(producer.spec)
    producer.bind_producer()
    consumer.bind_consumer()
    return producer, consumer


def close_pair(producer: Ring, consumer: Ring) -> None:
    consumer.close()
    producer.close()


def test_create_names_and_unlinks_segment():
    ring = Ring.create(640, 8, prefix=TEST_PREFIX)
    name = ring.spec.name
    assert name.startswith(f"{TEST_PREFIX}-{os.getpid()}-")
    assert os.path.exists(os.path.join(SHM_DIR, name))
    assert ring.spec == RingSpec(name, 640, 8, Policy.REFUSE)
    ring.close()
    ring.close()  # idempotent
    assert not os.path.exists(os.path.join(SHM_DIR, name))
    assert ring.closed


def test_spec_and_ring_pickle_to_an_attachment():
    with Ring.create(16, 2, Policy.DROP_OLDEST, prefix=TEST_PREFIX) as owner:
        spec = pickle.loads(pickle.dumps(owner.spec))
        assert spec == owner.spec and spec.policy is Policy.DROP_OLDEST
        with pickle.loads(pickle.dumps(owner)) as attached:
            assert not attached.owner and attached.spec == owner.spec
        assert os.path.exists(os.path.join(SHM_DIR, spec.name)), "closing an attachment must not unlink"


def test_attach_rejects_a_mismatched_spec_or_missing_segment():
    with Ring.create(16, 2, prefix=TEST_PREFIX) as owner:
        with pytest.raises(ValueError, match="spec says"):
            Ring.attach(RingSpec(owner.spec.name, 16, 2, Policy.DROP_OLDEST))
        with pytest.raises(ValueError, match="bytes"):
            Ring.attach(RingSpec(owner.spec.name, 200, 2, Policy.REFUSE))
    with pytest.raises(FileNotFoundError):
        Ring.attach(owner.spec)


@pytest.mark.parametrize("bad", [(0, 4), (4, 0)])
def test_create_rejects_empty_geometry(bad):
    with pytest.raises(ValueError):
        Ring.create(*bad, prefix=TEST_PREFIX)


def test_messages_keep_their_length_and_views_are_zero_copy_uint8():
    producer, consumer = make_pair(slot_size=640)
    samples = np.arange(-160, 160, dtype=np.int16)
    assert producer.try_write(samples)  # any C-contiguous buffer is taken as raw bytes
    assert producer.try_write(b"")  # empty messages are messages too
    assert producer.try_write(b"x" * 640)
    view = consumer.peek()
    assert view.dtype == np.uint8 and len(view) == 640
    np.testing.assert_array_equal(view.view(np.int16), samples)
    # Zero copy: the view aliases the slot, so a (misbehaving) overwrite of that slot shows through.
    producer._payloads[0][:2] = 0xAB
    assert view[0] == 0xAB
    assert consumer.release()
    assert consumer.read_bytes() == b""
    assert consumer.read_bytes() == b"x" * 640
    assert consumer.read_bytes() is None and consumer.peek() is None
    close_pair(producer, consumer)


def test_reserve_publish_in_place():
    producer, consumer = make_pair(slot_size=8, capacity=2)
    slot = producer.reserve()
    assert slot is producer.reserve(), "reserving again before publishing gives the same slot"
    slot[:3] = [1, 2, 3]
    assert consumer.peek() is None, "nothing is visible before publish"
    producer.publish(3)
    assert consumer.read_bytes() == bytes([1, 2, 3])
    with pytest.raises(RuntimeError):
        producer.publish(1)  # no reservation
    producer.reserve()
    with pytest.raises(ValueError):
        producer.publish(9)
    with pytest.raises(ValueError):
        producer.try_write(b"123456789")
    with pytest.raises(RuntimeError):
        consumer.release()  # empty ring
    close_pair(producer, consumer)


def test_wraps_around_many_times_in_order():
    producer, consumer = make_pair(slot_size=8, capacity=3)
    for i in range(1000):
        assert producer.try_write(i.to_bytes(8, "little"))
        if i % 3 == 2:
            for j in range(i - 2, i + 1):
                assert consumer.read_bytes() == j.to_bytes(8, "little")
    assert (producer.written, consumer.consumed, consumer.dropped, producer.refused) == (1000, 999, 0, 0)
    close_pair(producer, consumer)


def test_refuse_policy_counts_every_refusal():
    producer, consumer = make_pair(capacity=4, policy=Policy.REFUSE)
    assert all(producer.try_write(bytes([i])) for i in range(4))
    assert producer.try_write(b"no") is False
    assert producer.reserve() is None
    assert producer.try_write(b"no") is False
    assert (producer.written, producer.refused, consumer.pending()) == (4, 3, 4)
    assert consumer.read_bytes() == bytes([0])
    assert producer.try_write(bytes([4]))
    assert [consumer.read_bytes() for _ in range(4)] == [bytes([i]) for i in range(1, 5)]
    assert (consumer.written, consumer.consumed, consumer.dropped, consumer.refused) == (5, 5, 0, 3)
    close_pair(producer, consumer)


def test_drop_oldest_keeps_the_newest_and_counts_drops():
    producer, consumer = make_pair(capacity=4, policy=Policy.DROP_OLDEST)
    assert all(producer.try_write(bytes([i])) for i in range(10))
    assert consumer.pending() == 4
    assert [consumer.read_bytes() for _ in range(5)] == [bytes([i]) for i in range(6, 10)] + [None]
    assert (consumer.written, consumer.consumed, consumer.dropped, consumer.refused) == (10, 4, 6, 0)
    close_pair(producer, consumer)


def test_drop_oldest_detects_a_message_overwritten_while_held():
    producer, consumer = make_pair(slot_size=4, capacity=2, policy=Policy.DROP_OLDEST)
    producer.try_write(b"m0")
    producer.try_write(b"m1")
    held = consumer.peek()
    assert held.tobytes() == b"m0"
    producer.try_write(b"m2")  # overwrites m0's slot in place
    assert held.tobytes() == b"m2", "the zero-copy view now shows other data..."
    assert consumer.release() is False, "...and release() says so"
    assert consumer.read_bytes() == b"m1"
    assert consumer.read_bytes() == b"m2"
    assert (consumer.written, consumer.consumed, consumer.dropped) == (3, 2, 1)
    close_pair(producer, consumer)


def test_drop_oldest_skips_a_slot_being_overwritten():
    producer, consumer = make_pair(slot_size=4, capacity=2, policy=Policy.DROP_OLDEST)
    producer.try_write(b"m0")
    producer.try_write(b"m1")
    slot = producer.reserve()  # starts overwriting m0's slot; not published yet
    slot[:2] = np.frombuffer(b"zz", dtype=np.uint8)
    assert consumer.read_bytes() == b"m1", "m0 is half overwritten: skipped, never returned torn"
    assert consumer.read_bytes() is None
    producer.publish(2)
    assert consumer.read_bytes() == b"zz"
    assert (consumer.written, consumer.consumed, consumer.dropped) == (3, 2, 1)
    close_pair(producer, consumer)


def test_read_bytes_skips_overwritten_and_returns_an_intact_copy():
    producer, consumer = make_pair(slot_size=4, capacity=1, policy=Policy.DROP_OLDEST)
    producer.try_write(b"a")
    assert consumer.peek().tobytes() == b"a"
    producer.try_write(b"b")
    assert consumer.read_bytes() == b"b"  # the held "a" was overwritten: counted, then "b" read
    assert (consumer.consumed, consumer.dropped) == (1, 1)
    close_pair(producer, consumer)


def test_a_restarted_side_resumes_at_the_shared_indices():
    with Ring.create(8, 4, prefix=TEST_PREFIX) as owner:
        first = Ring.attach(owner.spec)
        first.bind_producer()
        first.try_write(b"1")
        first.close()
        consumer = Ring.attach(owner.spec)
        consumer.bind_consumer()
        assert consumer.producer_state() is PeerState.CLOSED
        second = Ring.attach(owner.spec)
        second.bind_producer()
        assert consumer.producer_state() is PeerState.ALIVE
        second.try_write(b"2")
        assert [consumer.read_bytes(), consumer.read_bytes()] == [b"1", b"2"]
        second.close()
        consumer.close()


def test_close_while_views_are_held_keeps_them_valid_and_still_unlinks():
    producer, consumer = make_pair()
    producer.try_write(b"still here")
    view = consumer.peek()
    name = producer.spec.name
    close_pair(producer, consumer)
    assert not os.path.exists(os.path.join(SHM_DIR, name))
    assert view.tobytes() == b"still here"  # the mapping lives as long as the view


def test_peer_states_in_one_process():
    with Ring.create(8, 2, prefix=TEST_PREFIX) as ring:
        assert ring.producer_state() is PeerState.UNBOUND and not ring.producer_alive()
        ring.bind_producer()
        ring.bind_consumer()
        assert ring.producer_alive() and ring.consumer_alive()
        ring.unbind()
        assert ring.producer_state() is PeerState.CLOSED and ring.consumer_state() is PeerState.CLOSED


def test_peer_state_defeats_pid_reuse():
    me = os.getpid()
    assert peer_state(me, process_start_time(me), 0) is PeerState.ALIVE
    assert peer_state(me, process_start_time(me) + 1, 0) is PeerState.DEAD  # same pid, other process
    assert peer_state(me, process_start_time(me), 1) is PeerState.CLOSED
    assert peer_state(0, 0, 0) is PeerState.UNBOUND


# -- model-based: a random op sequence against a deque model, both policies, exact counters ------------
OPS = st.lists(
    st.tuples(st.sampled_from(["write", "read", "peek_hold_write"]), st.integers(1, 9)), max_size=40
)


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 6), policy=st.sampled_from(Policy), script=OPS)
def test_matches_a_queue_model(capacity, policy, script):
    producer, consumer = make_pair(slot_size=8, capacity=capacity, policy=policy)
    model: collections.deque[bytes] = collections.deque()
    sent = refused = dropped = consumed = 0
    try:
        for op, count in script:
            for _ in range(count):
                if op == "read":
                    expected = model.popleft() if model else None
                    assert consumer.read_bytes() == expected
                    consumed += expected is not None
                    continue
                held = None
                if op == "peek_hold_write":  # hold the oldest message across one write
                    held = consumer.peek()
                    assert (held is None) == (not model)
                    assert held is None or held.tobytes() == model[0]
                was_full = len(model) == capacity
                message = sent.to_bytes(8, "little")
                ok = producer.try_write(message)
                if policy is Policy.REFUSE and was_full:
                    assert not ok
                    refused += 1
                else:
                    assert ok
                    sent += 1
                    if was_full:
                        model.popleft()
                        dropped += 1
                    model.append(message)
                if held is not None:
                    overwritten = policy is Policy.DROP_OLDEST and was_full
                    assert consumer.release() is not overwritten
                    if not overwritten:
                        model.popleft()
                        consumed += 1
        assert consumer.pending() == len(model)
        while model:  # drain, so lapped messages are accounted by the consumer too
            assert consumer.read_bytes() == model.popleft()
            consumed += 1
        assert consumer.read_bytes() is None
        assert (producer.written, consumer.consumed, consumer.dropped, producer.refused) == (
            sent,
            consumed,
            dropped,
            refused,
        )
        assert sent == consumed + dropped
    finally:
        close_pair(producer, consumer)
