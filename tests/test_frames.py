"""Frame layouts and how a reader tells sessions in a slot apart."""

import numpy as np

from procs.frames import (
    IN_SLOT_BYTES,
    OUT_SLOT_BYTES,
    FrameFate,
    SlotGenerations,
    read_in_frame,
    read_out_frame,
    write_in_frame,
    write_out_frame,
)


def test_a_new_generation_opens_a_session_and_its_frames_are_current() -> None:
    gens = SlotGenerations(2)
    assert not gens.is_open(0)
    assert gens.classify(0, 1) is FrameFate.NEW_SESSION
    assert gens.classify(0, 1) is FrameFate.CURRENT
    assert gens.is_open(0) and not gens.is_open(1)


def test_a_close_that_overtakes_its_sessions_last_frames_makes_them_stale() -> None:
    gens = SlotGenerations(1)
    gens.classify(0, 1)
    assert gens.close(0, 1)
    assert gens.classify(0, 1) is FrameFate.STALE
    assert not gens.is_open(0)


def test_a_close_that_overtakes_a_sessions_first_frame_never_opens_it() -> None:
    gens = SlotGenerations(1)
    assert not gens.close(0, 3)
    assert gens.classify(0, 3) is FrameFate.STALE
    assert gens.classify(0, 2) is FrameFate.STALE
    assert gens.classify(0, 4) is FrameFate.NEW_SESSION


def test_the_previous_sessions_frames_are_stale_once_the_next_one_started() -> None:
    gens = SlotGenerations(1)
    gens.classify(0, 1)
    assert gens.classify(0, 2) is FrameFate.NEW_SESSION
    assert gens.classify(0, 1) is FrameFate.STALE
    assert not gens.close(0, 1)  # closing the old one leaves the new one open
    assert gens.is_open(0)


def test_frames_round_trip_through_a_slot() -> None:
    slot = np.zeros(IN_SLOT_BYTES, np.uint8)
    pcm = np.arange(320, dtype=np.int16)
    assert write_in_frame(slot, 7, 123, 2, pcm.tobytes()) == IN_SLOT_BYTES
    hdr, got = read_in_frame(slot)
    assert (int(hdr["seq"]), int(hdr["t_ns"]), int(hdr["gen"])) == (7, 123, 2)
    assert np.array_equal(got, pcm)

    out = np.zeros(OUT_SLOT_BYTES, np.uint8)
    pcm24 = np.arange(480, dtype=np.int16)
    n = write_out_frame(
        out, pcm24, seq=5, t_in_ns=9, gen=3, block_pos=2, queue_us=2**40, step_us=1, resample_us=2, dropped=4
    )
    assert n == OUT_SLOT_BYTES
    frame = read_out_frame(out)
    assert (frame.seq, frame.t_in_ns, frame.gen, frame.block_pos, frame.dropped) == (5, 9, 3, 2, 4)
    assert (frame.step_us, frame.resample_us) == (1, 2)
    assert frame.queue_us == 2**32 - 1  # saturates instead of wrapping
    assert np.array_equal(np.frombuffer(frame.pcm, np.int16), pcm24)
