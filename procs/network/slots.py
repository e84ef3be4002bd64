"""Admission: which session slot each live session holds, sans I/O.

A slot is the session's row in every per-slot ring, and (through its inference worker's range,
procs/topology.py) a row of that worker's batch. Each slot counts the sessions it has held (`gen`), so a
message or frame about a session that has since left its slot is recognised anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from websockets.frames import CloseCode

from protocol import Error, ErrorCode, encode_server_control

T = TypeVar("T")
CAPACITY_MESSAGE = "Server at capacity"
CAPACITY_CLOSE_CODE = CloseCode.TRY_AGAIN_LATER  # 1013


def capacity_refusal() -> str:
    """The `error` a client hears when every slot is taken, before close 1013, so a page can say why."""
    return encode_server_control(Error(code=ErrorCode.CAPACITY, msg=CAPACITY_MESSAGE, fatal=True))


class SessionSlots(Generic[T]):
    """`n` slots; `admit` takes at most `capacity` sessions into the slots it is given (an engine may hold
    fewer sessions than its range has rings)."""

    def __init__(self, n: int) -> None:
        self._gen = [0] * n
        self._live: dict[int, tuple[int, T]] = {}

    def admit(self, capacity: int, create: Callable[[int, int], T], within: range | None = None) -> T | None:
        """A new session, made by `create(slot, gen)` in the lowest free slot of `within` (all of them if
        None: an inference worker's range otherwise); None when `capacity` sessions are live there already
        (or every slot there is taken)."""
        pool = range(len(self._gen)) if within is None else within
        slot = next((s for s in pool if s not in self._live), None)
        if slot is None or self.count(pool) >= capacity:
            return None
        self._gen[slot] += 1
        session = create(slot, self._gen[slot])  # raises: the slot stays free (its gen is simply skipped)
        self._live[slot] = (self._gen[slot], session)
        return session

    def count(self, within: range) -> int:
        """Live sessions in the slots of `within`."""
        return sum(1 for slot in self._live if slot in within)

    def release(self, slot: int, gen: int) -> bool:
        """Give the slot back; False (and nothing changes) unless session `gen` holds it."""
        held = self._live.get(slot)
        if held is None or held[0] != gen:
            return False
        del self._live[slot]
        return True

    def get(self, slot: int, gen: int) -> T | None:
        """The live session `gen` of `slot`, or None if it has left."""
        held = self._live.get(slot)
        return held[1] if held is not None and held[0] == gen else None

    def live(self) -> list[T]:
        return [session for _, session in self._live.values()]

    def __len__(self) -> int:
        return len(self._live)
