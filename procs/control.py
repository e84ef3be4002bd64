"""One direction of typed control between two of our processes.

An `InternalMessage` goes in, msgpack crosses a REFUSE ring, a typed message comes out. Control messages
must never vanish silently, and a sender must never block on its peer: a full ring refuses the message,
which is counted (`lost`) and logged, at most once a second with the number lost meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from procs.runtime import LogThrottle
from protocol import ProtocolError
from protocol.internal import InternalMessage, decode_internal, encode_internal
from ringbuf import Ring


class ControlChannel:
    def __init__(self, ring: Ring, *, name: str, log: logging.Logger) -> None:
        self.ring, self.name, self.log = ring, name, log
        self.lost = 0
        self._full_log = LogThrottle(period_s=1.0)

    def send(self, msg: InternalMessage) -> bool:
        """Write one message without waiting; False (counted, logged) if the ring is full."""
        if self.ring.try_write(encode_internal(msg)):
            return True
        self.lost += 1
        if (suppressed := self._full_log.allow(self.name, time.monotonic())) is not None:
            self.log.error("control ring %s full: lost %s (%d lost so far, %d not logged)",
                           self.name, type(msg).__name__, self.lost, suppressed)
        return False

    def receive(self) -> Iterator[InternalMessage]:
        """Every message waiting, oldest first. One that does not decode is logged and skipped: it can only
        come from a process of another version, and the ones after it are still good."""
        while (raw := self.ring.read_bytes()) is not None:
            try:
                yield decode_internal(raw)
            except ProtocolError:
                self.log.exception("undecodable message on %s (%d bytes)", self.name, len(raw))
