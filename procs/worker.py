"""What the inference and VAD processes share: following the sessions in their slots, and reading their audio.

Both workers learn the same things the same way. A session's start shows in its first frame (its `gen` is
new to the slot: audio and control travel in different rings, which are not ordered with respect to each
other); its id arrives in a `SessionOpen`, for the logs; its end arrives in a `SessionClose`, which may
overtake its last frames, so frames of a closed or older generation are dropped as stale.

A worker serves a range of session slots (`Place.slots`); here, as in its rings' lists, a slot is its index
in that range ("local"), and the messages' session slots are turned into it on the way in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from procs.frames import FrameFate, SlotGenerations, read_in_frame
from protocol import EndReason
from protocol.internal import InternalMessage, SessionClose, SessionOpen
from ringbuf import Ring

IDLE_WAIT_S = 0.5  # a worker's loop wakes at least this often with nothing to do (to beat its heartbeat)


@dataclass(frozen=True, slots=True)
class ClosedSession:
    slot: int  # local
    session_id: str
    reason: EndReason


@dataclass(frozen=True, slots=True)
class InputFrame:
    pcm: np.ndarray  # 320 int16 samples (a copy: the ring slot is released already)
    t_ns: int  # when the network process received it (time.monotonic_ns)
    first: bool  # the first frame of a new session in this slot: reset the slot's state before using it
    seq: int  # its index in the session (a worker restarted mid-session starts its clock there)


class WorkerSessions:
    """Which session each slot holds, as a worker process sees it."""

    def __init__(self, slots: range) -> None:
        self.slots = slots  # the session slots served, in order: local slot i is session slot slots[i]
        n_slots = len(slots)
        self.gens = SlotGenerations(n_slots)
        self._ids: dict[tuple[int, int], str] = {}
        self._lost = [0] * n_slots  # frames a slot's ring overwrote while they were read (DROP_OLDEST)

    def apply(self, msg: InternalMessage) -> ClosedSession | None:
        """Take a control message from the network; says so if it closed a slot's open session."""
        if not isinstance(msg, SessionOpen | SessionClose) or msg.slot not in self.slots:
            return None
        slot = self.slots.index(msg.slot)
        match msg:
            case SessionOpen(gen=gen, session_id=sid):
                self._ids[(slot, gen)] = sid
            case SessionClose(gen=gen, reason=reason):
                session_id = self._ids.pop((slot, gen), f"gen{gen}")
                if self.gens.close(slot, gen):
                    return ClosedSession(slot, session_id, reason)
        return None

    def forget_all(self, rings: list[Ring]) -> list[int]:
        """A network process (re)started: every session it had is gone. Closes every open slot and discards
        the audio queued in `rings`; returns the slots that were open."""
        open_slots = [slot for slot in range(len(self._lost)) if self.is_open(slot)]
        for slot in open_slots:
            self.close(slot)
        for ring in rings:
            while ring.peek() is not None:
                ring.release()
        self._ids.clear()
        self._lost = [0] * len(self._lost)
        self.gens = SlotGenerations(len(self._lost))  # a new network process numbers its sessions from 1
        return open_slots

    def local(self, session_slot: int, gen: int) -> int | None:
        """The local slot of session `gen` of `session_slot`, if it is open here."""
        if session_slot not in self.slots:
            return None
        slot = self.slots.index(session_slot)
        return slot if self.is_open(slot) and self.gen(slot) == gen else None

    def close(self, slot: int) -> None:
        """The worker ends the slot's session itself (evicted when memory ran out): its frames are stale."""
        self.gens.close(slot, self.gens.current[slot])

    def is_open(self, slot: int) -> bool:
        return self.gens.is_open(slot)

    def gen(self, slot: int) -> int:
        return self.gens.current[slot]

    def session_id(self, slot: int) -> str:
        """The id of the session the slot holds now (or last held), for logs."""
        return self._ids.get((slot, self.gens.current[slot]), f"gen{self.gens.current[slot]}")

    def take_lost(self, slot: int) -> int:
        """Frames of `slot` the ring overwrote while they were being read, since the last call."""
        lost, self._lost[slot] = self._lost[slot], 0
        return lost

    def read(self, slot: int, ring: Ring) -> Iterator[InputFrame]:
        """The slot's unread frames of its current session, oldest first; stale ones are skipped."""
        while (view := ring.peek()) is not None:
            header, pcm = read_in_frame(view)
            pcm = pcm.copy()
            gen, t_ns, seq = int(header["gen"]), int(header["t_ns"]), int(header["seq"])
            if not ring.release():
                self._lost[slot] += 1
                continue
            fate = self.gens.classify(slot, gen)
            if fate is FrameFate.NEW_SESSION:
                self._lost[slot] = 0  # frames lost before it belonged to the session that left
            if fate is not FrameFate.STALE:
                yield InputFrame(pcm, t_ns, first=fate is FrameFate.NEW_SESSION, seq=seq)
