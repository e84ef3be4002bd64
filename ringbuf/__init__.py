"""Lock-free SPSC shared-memory rings of fixed-size byte slots, with eventfd doorbells.

See ringbuf.ring for the layout and the memory-ordering argument, ringbuf.doorbell for wake-ups and
passing doorbells to spawned children, ringbuf.wait for waiting on many rings (sync and asyncio),
ringbuf.board for single-writer words that are overwritten rather than queued (heartbeats).
"""

from ringbuf.board import Board, BoardSpec
from ringbuf.doorbell import Doorbell
from ringbuf.procinfo import PeerState
from ringbuf.ring import Policy, Ring, RingSpec
from ringbuf.wait import DEFAULT_SPIN_S, any_ready, wait_any, wait_any_async

__all__ = [
    "DEFAULT_SPIN_S",
    "Board",
    "BoardSpec",
    "Doorbell",
    "PeerState",
    "Policy",
    "Ring",
    "RingSpec",
    "any_ready",
    "wait_any",
    "wait_any_async",
]
