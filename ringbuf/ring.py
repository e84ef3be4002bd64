"""Lock-free single-producer single-consumer ring of fixed-size slots in POSIX shared memory.

Layout of the segment /dev/shm/<name> (all words little-endian u64, 8-byte aligned):

    bytes   0..63   constants, written once by the creator: magic, version, slot_size, capacity,
                    policy, slot stride
    bytes  64..127  written only by the producer: write index, refused, pid, start time, closed flag
    bytes 128..191  written only by the consumer: read index, dropped, consumed, pid, start time,
                    closed flag
    bytes 256..     `capacity` slots of `stride` bytes (a multiple of 64): [seq u64][length u64][payload]

The producer and consumer lines are separate cache lines so each side's stores do not invalidate
the line the other side writes. Indices are monotonically increasing u64 message counters (they
never wrap in practice: 2**64 frames at 50 Hz is 10**10 years); message i lives in slot i % capacity.
A slot's seq word holds i + 1 once message i is complete in it, or 0 while the producer overwrites
it (DROP_OLDEST), so a tag names exactly one message and there is no ABA problem.

Memory ordering (why this is safe on x86-64 without fences)
------------------------------------------------------------
x86-64 is TSO: stores are not reordered with other stores, loads are not reordered with other
loads, and loads are not reordered with later stores. Every shared word is an aligned 8-byte
location read and written with single 8-byte loads/stores (memoryview 'Q' items: CPython packs and
unpacks them with a fixed-size 8-byte memcpy, i.e. one mov), so no access is torn.
* Publish: the producer writes the payload, then the slot's length and seq, and only then stores
  the write index. Another core that sees the new write index therefore sees the payload too.
  (Payload copies are plain stores; glibc's non-temporal memcpy path, used only for copies of
  megabytes, ends with an sfence, and the order of stores *within* one copy does not matter.)
* Consume: the consumer loads the write index before it loads the length and the payload (load/load
  order), and stores the read index only after it has read the payload (loads are not reordered
  with later stores), so under REFUSE the producer never reuses a slot that is still being read.
* DROP_OLDEST (seqlock): before overwriting a slot in place the producer stores seq = 0, then the
  payload, then seq = i + 1. The consumer loads seq (must be i + 1), reads the payload, and on
  release() loads seq again. If any payload load saw a byte of a newer message, the producer's
  earlier seq = 0 store is already visible, so the second seq load cannot return i + 1: release()
  returns False and the consumer knows the data it read is not message i. Never silent corruption.
The Python interpreter between these accesses is opaque C code to the compiler, so it cannot move
the loads and stores either. The doorbell write after publishing is a syscall (a full barrier).

An ARM (or any weakly ordered) port would need real barriers that Python cannot emit: a release
store (stlr, or dmb ish + str) for the write/read index and for seq = i + 1; an acquire load (ldar)
of the write index before reading the slot; dmb ishst between the seq = 0 store and the payload
writes; and dmb ishld between the payload reads and the seq re-check in release(). In practice that
means moving these few accesses into a small C extension (or C11 atomics via cffi).

Lifetime: only the creator (owner) unlinks the segment. Attaching processes open /dev/shm/<name>
with os.open + mmap, so they never register it with multiprocessing's resource tracker (Python 3.11
registers every SharedMemory() attach, and the tracker then unlinks or warns at exit). The owner
does register it, as a safety net: if the owner is SIGKILLed the tracker unlinks the segment (and
warns). close() (or the context manager, or a weakref finalizer at GC / interpreter exit) unlinks
and unregisters, so normal runs leave nothing behind and print nothing.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import os
import secrets
import weakref
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from ringbuf.doorbell import Doorbell
from ringbuf.procinfo import PeerState, peer_state, process_start_time
from ringbuf.segment import attach_segment, create_segment, unlink_segment

CACHE_LINE = 64
HEADER_BYTES = 256
SLOT_HEADER_BYTES = 16  # seq u64 + length u64
MAGIC = 0x5652494E47425546  # "VRINGBUF"
LAYOUT_VERSION = 1
SEQ_BUSY = 0  # a slot's seq while the producer overwrites it

# Word indices into the header (u64 units).
_MAGIC, _VERSION, _SLOT_SIZE, _CAPACITY, _POLICY, _STRIDE = 0, 1, 2, 3, 4, 5
# Producer-written line.
_W, _REFUSED, _PROD_PID, _PROD_START, _PROD_CLOSED = 8, 9, 10, 11, 12
# Consumer-written line.
_R, _DROPPED, _CONSUMED, _CONS_PID, _CONS_START, _CONS_CLOSED = 16, 17, 18, 19, 20, 21


class Policy(enum.IntEnum):
    REFUSE = 0  # a full ring refuses the write (reserve() -> None, try_write() -> False), counted
    DROP_OLDEST = 1  # a full ring overwrites the oldest unread message; the consumer counts it dropped


@dataclass(frozen=True)
class RingSpec:
    """Everything another process needs to attach, small and picklable: it travels pickled, inside the
    Topology that the supervisor passes to each child it spawns (multiprocessing's spawn arguments)."""

    name: str
    slot_size: int
    capacity: int
    policy: Policy


def slot_stride(slot_size: int) -> int:
    return -(-(SLOT_HEADER_BYTES + slot_size) // CACHE_LINE) * CACHE_LINE


def segment_bytes(slot_size: int, capacity: int) -> int:
    return HEADER_BYTES + capacity * slot_stride(slot_size)


class Ring:
    """One SPSC ring. Make one with `Ring.create` (owner) or `Ring.attach(spec)` (any process).

    A handle acts as the producer, the consumer, or (in tests) both; each side's methods must be
    called from one thread of one process at a time. A handle pickles as its spec, so passing a Ring
    to a spawned child attaches it there (the child does not own it).
    """

    def __init__(self, spec: RingSpec, segment: mmap.mmap, *, owner: bool) -> None:
        """Internal: use create() or attach()."""
        self._spec = spec
        self._mm: mmap.mmap | None = segment
        if len(segment) != segment_bytes(spec.slot_size, spec.capacity):
            raise ValueError(f"/dev/shm/{spec.name} has {len(segment)} bytes, not what {spec} needs")
        with memoryview(segment).cast("Q") as header:  # released even if the checks fail
            if header[_MAGIC] != MAGIC or header[_VERSION] != LAYOUT_VERSION:
                raise ValueError(f"/dev/shm/{spec.name} is not a ring segment of layout {LAYOUT_VERSION}")
            found = (header[_SLOT_SIZE], header[_CAPACITY], header[_POLICY])
            if found != (spec.slot_size, spec.capacity, int(spec.policy)):
                raise ValueError(f"{spec.name} has (slot_size, capacity, policy) {found}, spec says {spec}")
            stride = header[_STRIDE]
        self._words = memoryview(segment).cast("Q")
        words = self._words
        self._cap = spec.capacity
        self._slot_size = spec.slot_size
        self._drop_oldest = spec.policy == Policy.DROP_OLDEST
        all_bytes = np.frombuffer(segment, dtype=np.uint8)
        offsets = [HEADER_BYTES + i * stride for i in range(self._cap)]
        # Per-slot views and word indices are built once so the hot path only indexes lists.
        self._payloads: list[np.ndarray] = [
            all_bytes[o + SLOT_HEADER_BYTES : o + SLOT_HEADER_BYTES + spec.slot_size] for o in offsets
        ]
        self._payload_mvs: list[memoryview] = [memoryview(p) for p in self._payloads]
        self._seq_word: list[int] = [o // 8 for o in offsets]  # the length word follows it
        # Local copies of the words this handle's side is the only writer of, and caches of the other's.
        self._w = words[_W]
        self._refused = words[_REFUSED]
        self._r = words[_R]
        self._dropped = words[_DROPPED]
        self._consumed = words[_CONSUMED]
        self._r_seen_by_producer = self._r
        self._w_seen_by_consumer = self._w
        self._reserved_slot = -1
        self._held = False
        self._bell: Doorbell | None = None
        self._bound_producer = False
        self._bound_consumer = False
        self._owner = owner
        self._finalizer = weakref.finalize(self, unlink_segment, spec.name) if owner else None

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def create(
        cls, slot_size: int, capacity: int, policy: Policy = Policy.REFUSE, *, prefix: str = "vring"
    ) -> Ring:
        """Create and own a new ring named `<prefix>-<pid>-<random hex>` in /dev/shm."""
        if slot_size < 1 or capacity < 1:
            raise ValueError(f"slot_size and capacity must be >= 1, got {slot_size}, {capacity}")
        if not prefix or "/" in prefix:
            raise ValueError(f"bad prefix {prefix!r}")
        policy = Policy(policy)
        name = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        segment = create_segment(name, segment_bytes(slot_size, capacity))  # zeros: every counter at 0
        words = memoryview(segment).cast("Q")
        words[_SLOT_SIZE] = slot_size
        words[_CAPACITY] = capacity
        words[_POLICY] = int(policy)
        words[_STRIDE] = slot_stride(slot_size)
        words[_VERSION] = LAYOUT_VERSION
        words[_MAGIC] = MAGIC
        words.release()
        try:
            return cls(RingSpec(name, slot_size, capacity, policy), segment, owner=True)
        except BaseException:
            segment.close()
            unlink_segment(name)
            raise

    @classmethod
    def attach(cls, spec: RingSpec) -> Ring:
        """Map an existing ring without owning it (and without telling the resource tracker)."""
        segment = attach_segment(spec.name)
        try:
            return cls(spec, segment, owner=False)
        except BaseException:
            segment.close()
            raise

    def __reduce__(self) -> tuple[Any, ...]:
        return (Ring.attach, (self._spec,))

    @property
    def spec(self) -> RingSpec:
        return self._spec

    @property
    def owner(self) -> bool:
        return self._owner

    # -- producer side ------------------------------------------------------------------------------------
    def bind_producer(self, doorbell: Doorbell | None = None) -> None:
        """Become the producer: record this process for liveness checks; ring `doorbell` on publish."""
        words = self._words
        # pid is stored last (and was zeroed first) so a reader that loads pid first never pairs a new
        # pid with the previous producer's start time or closed flag.
        words[_PROD_PID] = 0
        words[_PROD_START] = process_start_time(os.getpid())
        words[_PROD_CLOSED] = 0
        words[_PROD_PID] = os.getpid()
        self._w = words[_W]
        self._refused = words[_REFUSED]
        self._r_seen_by_producer = words[_R]
        self._reserved_slot = -1
        self._bell = doorbell
        self._bound_producer = True

    def reserve(self) -> np.ndarray | None:
        """A uint8 view of the next slot (slot_size bytes) to fill in place, then publish(n).

        None if the ring is full under REFUSE (counted in `refused`, once per refused call). Under
        DROP_OLDEST it never fails: it takes the oldest slot, unread or not.
        """
        slot = self._reserved_slot
        if slot >= 0:
            return self._payloads[slot]
        w = self._w
        slot = w % self._cap
        if self._drop_oldest:
            self._words[self._seq_word[slot]] = SEQ_BUSY  # before any payload byte changes (seqlock)
        elif w - self._r_seen_by_producer >= self._cap:
            self._r_seen_by_producer = self._words[_R]
            if w - self._r_seen_by_producer >= self._cap:
                self._refused += 1
                self._words[_REFUSED] = self._refused
                return None
        self._reserved_slot = slot
        return self._payloads[slot]

    def publish(self, nbytes: int) -> None:
        """Make the reserved slot's first `nbytes` bytes visible to the consumer and ring the bell."""
        slot = self._reserved_slot
        if slot < 0:
            raise RuntimeError("publish() without a reserve()")
        if not 0 <= nbytes <= self._slot_size:
            raise ValueError(f"nbytes {nbytes} not in 0..{self._slot_size}")
        words = self._words
        seq_word = self._seq_word[slot]
        w = self._w + 1
        words[seq_word + 1] = nbytes
        words[seq_word] = w  # tag = index + 1 of the message now complete in this slot
        words[_W] = w  # the publishing store: everything above is visible before it (TSO)
        self._w = w
        self._reserved_slot = -1
        bell = self._bell
        if bell is not None:
            bell.ring()  # after publishing: see ringbuf.doorbell on lost wake-ups

    def try_write(self, data: bytes | bytearray | memoryview | np.ndarray) -> bool:
        """Copy one message in and publish it. False if the ring is full under REFUSE."""
        src = memoryview(data)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")  # any C-contiguous buffer (e.g. an int16 array) as raw bytes
        nbytes = src.nbytes
        if nbytes > self._slot_size:
            raise ValueError(f"message of {nbytes} bytes does not fit slot_size {self._slot_size}")
        if self.reserve() is None:
            return False
        self._payload_mvs[self._reserved_slot][:nbytes] = src
        self.publish(nbytes)
        return True

    # -- consumer side ------------------------------------------------------------------------------------
    def bind_consumer(self) -> None:
        """Become the consumer: record this process for liveness checks; resume at the read index."""
        words = self._words
        words[_CONS_PID] = 0
        words[_CONS_START] = process_start_time(os.getpid())
        words[_CONS_CLOSED] = 0
        words[_CONS_PID] = os.getpid()
        self._r = words[_R]
        self._dropped = words[_DROPPED]
        self._consumed = words[_CONSUMED]
        self._w_seen_by_consumer = words[_W]
        self._held = False
        self._bound_consumer = True

    def peek(self) -> np.ndarray | None:
        """Zero-copy uint8 view of the oldest unread message (exactly its length), or None if empty.

        The view aliases shared memory: use it (or copy it) before release(). Under DROP_OLDEST the
        producer may overwrite it meanwhile; release() then returns False and the data must be
        discarded. Lapped messages are skipped here and counted in `dropped`.
        """
        if self._drop_oldest:
            return self._peek_lossy()
        r = self._r
        if r == self._w_seen_by_consumer:
            self._w_seen_by_consumer = self._words[_W]
            if r == self._w_seen_by_consumer:
                return None
        slot = r % self._cap
        nbytes = self._words[self._seq_word[slot] + 1]
        self._held = True
        return self._payloads[slot][:nbytes]

    def _peek_lossy(self) -> np.ndarray | None:
        words = self._words
        cap = self._cap
        r = self._r
        w = words[_W]
        if r == w:
            return None
        lost = 0
        nbytes = -1
        while True:
            if w - r > cap:  # lapped: the oldest `cap` messages are the only ones that can still exist
                lost += w - cap - r
                r = w - cap
            seq_word = self._seq_word[r % cap]
            if words[seq_word] == r + 1:
                nbytes = words[seq_word + 1]
                break
            # The slot is being overwritten (seq 0) or already holds a newer message: message r is gone.
            lost += 1
            r += 1
            if r == w:
                w = words[_W]
                if r == w:
                    break
        if lost:
            self._dropped += lost
            words[_DROPPED] = self._dropped
            self._r = r
            words[_R] = r
        if nbytes < 0:
            return None
        self._held = True
        return self._payloads[r % cap][:nbytes]

    def release(self) -> bool:
        """Consume the message peek() returned (peeks first if needed; RuntimeError if empty).

        True if it was intact. False (DROP_OLDEST only) if the producer overwrote it while it was
        held: then it is counted in `dropped`, not `consumed`, and what was read from it is garbage.
        """
        if not self._held and self.peek() is None:
            raise RuntimeError("release() on an empty ring")
        self._held = False
        words = self._words
        r = self._r
        intact = not self._drop_oldest or words[self._seq_word[r % self._cap]] == r + 1
        if intact:
            self._consumed += 1
            words[_CONSUMED] = self._consumed
        else:
            self._dropped += 1
            words[_DROPPED] = self._dropped
        self._r = r + 1
        words[_R] = r + 1  # after the payload reads: frees the slot for the producer (REFUSE)
        return intact

    def read_bytes(self) -> bytes | None:
        """Copy out and release the oldest intact message; None if there is none."""
        while True:
            view = self.peek()
            if view is None:
                return None
            data = view.tobytes()
            if self.release():
                return data

    def pending(self) -> int:
        """Messages published and not yet consumed or dropped (at most capacity)."""
        return min(self._words[_W] - self._words[_R], self._cap)

    # -- counters (shared header; each written by one side) ------------------------------------------------
    @property
    def written(self) -> int:
        return self._words[_W]

    @property
    def consumed(self) -> int:
        return self._words[_CONSUMED]

    @property
    def dropped(self) -> int:
        return self._words[_DROPPED]

    @property
    def refused(self) -> int:
        return self._words[_REFUSED]

    # -- peers --------------------------------------------------------------------------------------------
    @property
    def producer_key(self) -> tuple[int, int]:
        """(pid, start time) of the bound producer; pid 0 if none bound yet."""
        return self._words[_PROD_PID], self._words[_PROD_START]

    def producer_state(self) -> PeerState:
        words = self._words
        return peer_state(words[_PROD_PID], words[_PROD_START], words[_PROD_CLOSED])

    def consumer_state(self) -> PeerState:
        words = self._words
        return peer_state(words[_CONS_PID], words[_CONS_START], words[_CONS_CLOSED])

    def producer_alive(self) -> bool:
        """True only while a bound producer process runs and has not closed its side."""
        return self.producer_state() is PeerState.ALIVE

    def consumer_alive(self) -> bool:
        """True only while a bound consumer process runs and has not closed its side."""
        return self.consumer_state() is PeerState.ALIVE

    def wake_reason(self, exited: AbstractSet[tuple[int, int]]) -> tuple[str, int, int] | bool:
        """Cheap check for consumer-side waiters (no syscalls).

        True if a message is unread; else, if the bound producer is gone (closed, or in `exited`: the
        processes a doorbell's pidfds saw exit), a token naming this ring and that producer, so a
        waiter can report each departure once; else False.
        """
        words = self._words
        if words[_W] != self._r:
            return True
        pid = words[_PROD_PID]
        if pid == 0:
            return False
        start = words[_PROD_START]
        if words[_PROD_CLOSED] or (exited and (pid, start) in exited):
            return (self._spec.name, pid, start)
        return False

    # -- lifetime -----------------------------------------------------------------------------------------
    def unbind(self) -> None:
        """Close this handle's side(s) cleanly (the peer sees PeerState.CLOSED); the mapping stays."""
        if self._bound_producer:
            self._words[_PROD_CLOSED] = 1
            self._bound_producer = False
            if self._bell is not None and not self._bell.closed:
                self._bell.ring()  # wake the consumer so it notices promptly
        if self._bound_consumer:
            self._words[_CONS_CLOSED] = 1
            self._bound_consumer = False

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        """Unbind, unmap and (owner only) unlink. Idempotent.

        If the caller still holds views from reserve()/peek(), the mapping stays valid until those
        are garbage-collected (numpy keeps it alive), so a late access never faults; the name is
        unlinked regardless.
        """
        segment = self._mm
        if segment is None:
            return
        try:
            self.unbind()
        finally:
            self._mm = None
            for view in self._payload_mvs:
                view.release()
            self._payload_mvs = []
            self._payloads = []
            self._words.release()
            # Views still exported to the caller keep the mapping alive until they are collected.
            with contextlib.suppress(BufferError):
                segment.close()
            if self._finalizer is not None:
                self._finalizer()

    def __enter__(self) -> Ring:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._mm is None:
            return f"Ring({self._spec.name}, closed)"
        return (
            f"Ring({self._spec.name}, slot_size={self._slot_size}, capacity={self._cap}, "
            f"policy={self._spec.policy.name}, written={self.written}, consumed={self.consumed}, "
            f"dropped={self.dropped}, refused={self.refused})"
        )
