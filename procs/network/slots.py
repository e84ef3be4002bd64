"""Admission: which batch slot each live session holds, sans I/O.

A slot is the session's row in every ring and in the model's batch. Each slot counts the sessions it has
held (`gen`), so a message or frame about a session that has since left its slot is recognised anywhere.
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
    """`n` slots, at most `capacity` of them in use (the engine may hold fewer sessions than rings exist)."""

    def __init__(self, n: int) -> None:
        self._free = list(range(n - 1, -1, -1))  # popped from the end: slot 0 first
        self._gen = [0] * n
        self._live: dict[int, tuple[int, T]] = {}

    def admit(self, capacity: int, create: Callable[[int, int], T]) -> T | None:
        """A new session, made by `create(slot, gen)` in a free slot; None when `capacity` sessions are live
        already (or every slot is taken)."""
        if not self._free or len(self._live) >= capacity:
            return None
        slot = self._free.pop()
        self._gen[slot] += 1
        try:
            session = create(slot, self._gen[slot])
        except BaseException:
            self._free.append(slot)
            raise
        self._live[slot] = (self._gen[slot], session)
        return session

    def release(self, slot: int, gen: int) -> bool:
        """Give the slot back; False (and nothing changes) unless session `gen` holds it."""
        held = self._live.get(slot)
        if held is None or held[0] != gen:
            return False
        del self._live[slot]
        self._free.append(slot)
        return True

    def get(self, slot: int, gen: int) -> T | None:
        """The live session `gen` of `slot`, or None if it has left."""
        held = self._live.get(slot)
        return held[1] if held is not None and held[0] == gen else None

    def live(self) -> list[T]:
        return [session for _, session in self._live.values()]

    def __len__(self) -> int:
        return len(self._live)
