"""Lock-free SPSC shared-memory rings of fixed-size byte slots, with eventfd doorbells.

See ringbuf.ring for the layout and the memory-ordering argument, ringbuf.doorbell for wake-ups and
passing doorbells to spawned children, ringbuf.wait for waiting on many rings (sync and asyncio),
ringbuf.board for single-writer words that are overwritten rather than queued (heartbeats).
"""

from ringbuf.board import Board, BoardSpec
from ringbuf.doorbell import Doorbell
from ringbuf.ring import Policy, Ring, RingSpec
from ringbuf.wait import wait_any

# What the server's processes use; the rest (PeerState, wait_any_async, ...) from its own module.
__all__ = [
    "Board",
    "BoardSpec",
    "Doorbell",
    "Policy",
    "Ring",
    "RingSpec",
    "wait_any",
]
