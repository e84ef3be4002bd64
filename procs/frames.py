"""Layouts of the audio frames that travel through the rings between our processes.

The ring knows nothing of audio; this module is where a slot's bytes get their meaning. Each frame carries
its session generation (`gen`), so that a process can tell a new session in a slot from frames of the one
before it without waiting for a control message (rings are ordered, but two rings are not ordered with
respect to each other).
"""

from __future__ import annotations

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
        ("dropped", "<u4"),  # input frames this session has dropped so far
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


def read_out_header(slot: np.ndarray) -> np.void:
    return slot[: OUT_HEADER.itemsize].view(OUT_HEADER)[0]
