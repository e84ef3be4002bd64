"""Layouts of the audio frames that travel through the rings between our processes.

The ring knows nothing of audio; this module is where a slot's bytes get their meaning. Each frame carries
its session generation (`gen`), so that a process can tell a new session in a slot from frames of the one
before it without waiting for a control message (rings are ordered, but two rings are not ordered with
respect to each other).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from protocol import IN_FRAME_BYTES, OUT_FRAME_BYTES

# Client audio as received by the network process, 20 ms at 16 kHz.
IN_HEADER = np.dtype([("seq", "<u8"), ("t_ns", "<u8"), ("gen", "<u4"), ("flags", "<u4")])
IN_SLOT_BYTES = IN_HEADER.itemsize + IN_FRAME_BYTES

# Model audio for the network process, 20 ms at 24 kHz, with the timing of the block that produced it.
OUT_HEADER = np.dtype(
    [
        ("seq", "<u8"),  # output frame index in the session
        ("t_in_ns", "<u8"),  # when the network received the last input frame of the block answered
        ("gen", "<u4"),
        ("block_pos", "<u4"),  # 0..3: position of this 20 ms frame in its 80 ms block
        ("queue_us", "<u4"),  # block ready -> step start
        ("step_us", "<u4"),  # the batched step
        ("resample_us", "<u4"),  # resampling on this block's path
        ("dropped", "<u4"),  # input frames this session has dropped so far (it fell behind)
        ("realigned", "<u4"),  # input frames dropped or repeated so far to keep it on the step clock
        ("skipped", "<u4"),  # first input frames skipped to place the session on the step clock
    ]
)
OUT_SLOT_BYTES = OUT_HEADER.itemsize + OUT_FRAME_BYTES


def write_in_frame(slot: np.ndarray, seq: int, t_ns: int, gen: int, pcm: bytes | memoryview) -> int:
    """Fill a reserved ring slot with one input frame; returns the byte count to publish."""
    hdr = slot[: IN_HEADER.itemsize].view(IN_HEADER)
    hdr["seq"] = seq
    hdr["t_ns"] = t_ns
    hdr["gen"] = gen
    hdr["flags"] = 0
    slot[IN_HEADER.itemsize : IN_SLOT_BYTES] = np.frombuffer(pcm, dtype=np.uint8)
    return IN_SLOT_BYTES


def read_in_frame(slot: np.ndarray) -> tuple[np.void, np.ndarray]:
    """Header and int16 samples (a view into the slot) of one input frame."""
    return slot[: IN_HEADER.itemsize].view(IN_HEADER)[0], slot[IN_HEADER.itemsize : IN_SLOT_BYTES].view(
        np.int16
    )


_U32_MAX = 2**32 - 1


def write_out_frame(
    slot: np.ndarray,
    pcm: np.ndarray,
    *,
    seq: int,
    t_in_ns: int,
    gen: int,
    block_pos: int,
    queue_us: int,
    step_us: int,
    resample_us: int,
    dropped: int,
    realigned: int = 0,
    skipped: int = 0,
) -> int:
    """Fill a reserved ring slot with one 20 ms output frame (`pcm`: 480 int16); returns the byte count to
    publish. Timings saturate at the u32 maximum rather than wrap."""
    hdr = slot[: OUT_HEADER.itemsize].view(OUT_HEADER)
    hdr["seq"] = seq
    hdr["t_in_ns"] = t_in_ns
    hdr["gen"] = gen
    hdr["block_pos"] = block_pos
    hdr["queue_us"] = min(queue_us, _U32_MAX)
    hdr["step_us"] = min(step_us, _U32_MAX)
    hdr["resample_us"] = min(resample_us, _U32_MAX)
    hdr["dropped"] = min(dropped, _U32_MAX)
    hdr["realigned"] = min(realigned, _U32_MAX)
    hdr["skipped"] = min(skipped, _U32_MAX)
    slot[OUT_HEADER.itemsize : OUT_SLOT_BYTES] = pcm.view(np.uint8)
    return OUT_SLOT_BYTES


@dataclass(frozen=True, slots=True)
class ModelFrame:
    """One 20 ms frame of model audio as the network process reads it: timings and a copy of the PCM."""

    seq: int
    t_in_ns: int
    gen: int
    block_pos: int
    queue_us: int
    step_us: int
    resample_us: int
    dropped: int
    realigned: int
    pcm: bytes  # 960 bytes, 24 kHz s16le
    skipped: int = 0


def read_out_frame(slot: np.ndarray) -> ModelFrame:
    """One output frame, copied out of its ring slot (so the slot can be released at once)."""
    h = slot[: OUT_HEADER.itemsize].view(OUT_HEADER)[0]
    return ModelFrame(
        seq=int(h["seq"]),
        t_in_ns=int(h["t_in_ns"]),
        gen=int(h["gen"]),
        block_pos=int(h["block_pos"]),
        queue_us=int(h["queue_us"]),
        step_us=int(h["step_us"]),
        resample_us=int(h["resample_us"]),
        dropped=int(h["dropped"]),
        realigned=int(h["realigned"]),
        skipped=int(h["skipped"]),
        pcm=slot[OUT_HEADER.itemsize : OUT_SLOT_BYTES].tobytes(),
    )


class FrameFate(enum.Enum):
    STALE = enum.auto()  # from a session that has left the slot (or was never admitted there)
    NEW_SESSION = enum.auto()  # first frame of a new session in the slot: reset the slot's state
    CURRENT = enum.auto()  # from the slot's open session


class SlotGenerations:
    """Which session each slot holds, told apart by the `gen` its frames carry.

    The network process numbers the sessions of each slot 1, 2, 3, ... A reader learns that a new session
    started from its first frame (audio and control travel in different rings, which are not ordered with
    respect to each other), and that one ended from its `SessionClose`, which may overtake that session's
    last frames; frames of a closed or older generation are stale either way.
    """

    def __init__(self, n_slots: int) -> None:
        self.current = [0] * n_slots
        self.closed = [0] * n_slots

    def classify(self, slot: int, gen: int) -> FrameFate:
        if gen == self.current[slot]:
            return FrameFate.CURRENT if gen > self.closed[slot] else FrameFate.STALE
        if gen <= max(self.current[slot], self.closed[slot]):
            return FrameFate.STALE
        self.current[slot] = gen
        return FrameFate.NEW_SESSION

    def close(self, slot: int, gen: int) -> bool:
        """Record that session `gen` left `slot`; True if that closed the slot's open session."""
        was_open = self.is_open(slot) and self.current[slot] == gen
        self.closed[slot] = max(self.closed[slot], gen)
        return was_open

    def is_open(self, slot: int) -> bool:
        return self.current[slot] > self.closed[slot]
